"""The structural check of a lowered program, one for every backend: what must hold of
it beyond its numbers, and all that can be said where the backend's runtime does not
exist on the build host (Core ML, Vulkan, CUDA here).

The program must have the task's methods, each must call the backend's delegate
(``BACKEND_ID``), every payload of it must be non-empty and pass the backend's own
``payload_problem(blob)`` where it has one; a backend that declares ``OUTSIDE_OPS``
(MLX) may leave no other kernel outside its delegate. The result says plainly that
nothing ran.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType


def check(pte: Path, info: dict, backend: ModuleType, expected: tuple = ("forward",)) -> dict:
    """``info``: ``mlxbuild inspect``'s summary of ``pte``; ``expected``: the task's methods."""
    backend_id = backend.BACKEND_ID
    allowed_outside = getattr(backend, "OUTSIDE_OPS", None)
    payload_problem = getattr(backend, "payload_problem", None)
    problems, methods = [], info.get("methods", {})
    problems += [f"no {name} method" for name in expected if name not in methods]
    found = 0
    for name, method in methods.items():
        ours = [d for d in method.get("delegates", []) if d["backend_id"] == backend_id]
        if (name in expected or allowed_outside is not None) and not ours:
            others = sorted({d["backend_id"] for d in method.get("delegates", [])})
            problems.append(f"{name}: {backend_id} delegate missing (delegates: {others or 'none'})")
        for d in ours:
            found += 1
            if not d.get("payload_bytes"):
                problems.append(f"{name}: empty {backend_id} payload")
        if allowed_outside is not None:
            left = [op for op in method.get("operators", []) if op.split(".")[0] not in allowed_outside]
            if left:
                problems.append(f"{name}: ops outside the delegate: {', '.join(left)}")
    if payload_problem is not None and found and not problems:
        from mlx_runtime.pte import delegate_payloads

        for i, blob in enumerate(delegate_payloads(pte, backend_id)):
            problem = payload_problem(blob)
            if problem:
                problems.append(f"{backend_id} payload {i}: {problem}")
    return {"passed": not problems, "executed": False, "reason": "; ".join(problems),
            "check": f"structural (no {backend.TITLE} runtime on this host)",
            "delegates": sorted({d["backend_id"] for m in methods.values() for d in m.get("delegates", [])}),
            "delegate_calls": found}
