"""Structural verification, for backends whose runtime does not exist on the build host.

The program must deserialize (the caller inspects it), its ``forward`` must call the
backend's delegate, and every delegate payload of that backend must be non-empty and
pass the backend's own payload check. The result says plainly that nothing ran.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def check(pte: Path, info: dict, backend_id: str, why: str,
          payload_check: Callable[[bytes], str] | None = None, expected: tuple = ("forward",)) -> dict:
    """``expected``: the methods the task has, each of which must call the delegate;
    ``payload_check(blob)`` returns a problem ("" when the payload is sound)."""
    problems, methods = [], info.get("methods", {})
    problems += [f"no {name} method" for name in expected if name not in methods]
    found = 0
    for name, method in methods.items():
        ours = [d for d in method.get("delegates", []) if d["backend_id"] == backend_id]
        if name in expected and not ours:
            others = sorted({d["backend_id"] for d in method.get("delegates", [])})
            problems.append(f"{name}: {backend_id} delegate missing (delegates: {others or 'none'})")
        for d in ours:
            found += 1
            if not d.get("payload_bytes"):
                problems.append(f"{name}: empty {backend_id} payload")
    if payload_check is not None and found and not problems:
        from mlxbuild.pte_inspect import delegate_payloads

        for i, blob in enumerate(delegate_payloads(pte, backend_id)):
            problem = payload_check(blob)
            if problem:
                problems.append(f"{backend_id} payload {i}: {problem}")
    return {"passed": not problems, "executed": False, "reason": "; ".join(problems),
            "check": f"structural ({why})",
            "delegates": sorted({d["backend_id"] for m in methods.values() for d in m.get("delegates", [])}),
            "delegate_calls": found}
