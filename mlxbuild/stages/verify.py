"""Run (or, where no runtime exists on this host, inspect) a lowered artifact and
compare it with the reference. A failure raises VerificationError and leaves
no cache entry, so the target is checked again on the next build.

What is run and compared is the task kind's (``mlxbuild.task_kinds``); which runtime
runs it, and what must hold of its structure, is the backend's.
"""

from __future__ import annotations

import json
from pathlib import Path

import delegate
from mlxbuild import task_kinds
from mlxbuild.errors import VerificationError
from mlxbuild.task_kinds.common import compare, native_stderr_captured  # noqa: F401  (kept importable here)


def run(params: dict, cache, out: Path) -> dict:
    backend = delegate.backend(params["backend"])
    kind = task_kinds.get(params.get("task"))
    lowered = cache.read("lower", params["lower"])
    if backend.VERIFY == "runtime":
        result = numerical(lowered / "model.pte", cache.read("reference", params["reference"]),
                           params["tolerance"], backend, kind)
        if result["passed"] and hasattr(backend, "check_structure"):
            # A runtime that runs any leftover op (the MLX one runs them with torch)
            # proves the numbers, not the partitioning: check that too.
            shape = structural(lowered / "model.pte", backend, kind)
            result["structure"] = {k: shape[k] for k in ("passed", "reason", "delegates") if k in shape}
            if not shape["passed"]:
                result.update(passed=False, reason=f"structure: {shape['reason']}")
    else:
        result = structural(lowered / "model.pte", backend, kind)
        result["coverage"] = coverage(lowered / "lower.json")
    # What was verified is these bytes: publishing and up-to-date checks compare them with
    # the lowered program they are about to trust (mlxbuild.tasks, mlxbuild.artifacts).
    result["artifact_sha256"] = cache.files("lower", params["lower"])["model.pte"]["sha256"]
    (out / "verify.json").write_text(json.dumps(result, indent=1))
    if not result["passed"]:
        raise VerificationError(f"{params['label']}: verification failed: {result['reason']}")
    return result


def coverage(lower_json: Path) -> dict:
    """How much of the program the delegate took (op counts from the lowering's
    delegation summary): what a structural check can say in place of numbers."""
    summary = json.loads(lower_json.read_text()).get("delegation", {})
    inside = sum(n for m in summary.values() for n in m.get("delegated_ops", {}).values())
    outside = {op: n for m in summary.values() for op, n in m.get("portable_ops", {}).items()
               if op != "alloc"}  # memory planning's buffers, not compute
    total = inside + sum(outside.values())
    return {"delegated_ops": inside, "portable_ops": sum(outside.values()),
            "delegated_fraction": round(inside / total, 4) if total else 0.0,
            "portable": dict(sorted(outside.items()))}


def numerical(pte: Path, reference: Path, tol: dict, backend=None, kind=None) -> dict:
    return (kind or task_kinds.get(None)).verify(pte, reference, tol, backend)


def structural(pte: Path, backend, kind=None) -> dict:
    from mlxbuild.pte_inspect import inspect_pte

    try:
        info = inspect_pte(pte)
    except Exception as e:
        return {"passed": False, "executed": False, "reason": f"does not deserialize: {e}"}
    import inspect

    check = backend.check_structure
    if "methods" in inspect.signature(check).parameters:  # backends written for forward-only programs lack it
        return check(info, methods=(kind or task_kinds.get(None)).METHODS)
    return check(info)
