"""Run (or, where no runtime exists on this host, inspect) a lowered artifact and
compare it with the reference. A failure raises VerificationError and leaves
no cache entry, so the target is checked again on the next build.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

import delegate
from mlxbuild.errors import VerificationError


def run(params: dict, cache, out: Path) -> dict:
    backend = delegate.backend(params["backend"])
    lowered = cache.path("lower", params["lower"])
    if backend.VERIFY == "runtime":
        result = numerical(lowered / "model.pte", cache.path("reference", params["reference"]),
                           params["tolerance"], backend)
        if result["passed"] and hasattr(backend, "check_structure"):
            # A runtime that runs any leftover op (the MLX one runs them with torch)
            # proves the numbers, not the partitioning: check that too.
            shape = structural(lowered / "model.pte", backend)
            result["structure"] = {k: shape[k] for k in ("passed", "reason", "delegates") if k in shape}
            if not shape["passed"]:
                result.update(passed=False, reason=f"structure: {shape['reason']}")
    else:
        result = structural(lowered / "model.pte", backend)
    (out / "verify.json").write_text(json.dumps(result, indent=1))
    if not result["passed"]:
        raise VerificationError(f"{params['label']}: verification failed: {result['reason']}")
    return result


def run_pte(pte: Path, tokens: np.ndarray, prompt: int, backend=None) -> np.ndarray:
    """Prefill `prompt` tokens, then decode the rest one by one; stack every logit row.

    Runs on the backend's own host runtime when it has one (``backend.load_method``,
    e.g. MLX through mlx.core), else on ExecuTorch's runtime."""
    import torch

    execute = None
    if backend is not None and hasattr(backend, "load_method"):
        execute = backend.load_method(pte, "forward")
    else:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  custom SDPA / KV cache kernels
        import executorch.kernels.quantized  # noqa: F401  quantized embedding kernels
        from executorch.runtime import Runtime

        execute = Runtime.get().load_program(str(pte)).load_method("forward").execute
    ids = torch.from_numpy(tokens)
    rows = [execute([ids[:, :prompt], torch.arange(prompt)])[0][0]]
    for pos in range(prompt, ids.shape[1]):
        rows.append(execute([ids[:, pos:pos + 1], torch.tensor([pos])])[0][0])
    return torch.cat(rows).float().numpy()


def compare(got: np.ndarray, ref: np.ndarray, tol: dict) -> dict:
    if got.shape != ref.shape:
        return {"passed": False, "reason": f"logits shape {got.shape} != reference {ref.shape}"}
    scale = float(np.abs(ref).max()) or 1.0
    err = float(np.abs(got - ref).max())
    rel = err / scale
    top_ref, top_got = ref.argmax(-1), got.argmax(-1)
    agree = float((top_ref == top_got).mean())
    srt = np.sort(ref, axis=-1)
    # Only positions where the reference's winner is clear must agree.
    decisive = (srt[:, -1] - srt[:, -2]) > 2 * err
    decisive_agree = float((top_ref == top_got)[decisive].mean()) if decisive.any() else 1.0
    passed = rel <= tol["max_rel_error"] and decisive_agree >= tol["min_top1_agreement"]
    reason = "" if passed else (
        f"max abs error {err:.3g} ({rel:.3g} of the largest logit, allowed {tol['max_rel_error']:.3g}), "
        f"top-1 agreement {agree:.2%} ({decisive_agree:.2%} where decisive)")
    return {"passed": passed, "reason": reason, "executed": True, "max_abs_error": err,
            "max_rel_error": rel, "top1_agreement": agree, "top1_agreement_decisive": decisive_agree,
            "positions": int(ref.shape[0]), "tolerance": tol}


@contextlib.contextmanager
def native_stderr_captured():
    """The ExecuTorch runtime logs from C++ straight to fd 2 (CPU probing and the like);
    keep it, and show it only when running the program fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        log = {"text": ""}
        try:
            yield log
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            log["text"] = sink.read().decode(errors="replace")


def numerical(pte: Path, reference: Path, tol: dict, backend=None) -> dict:
    tokens = np.load(reference / "tokens.npy")
    ref = np.load(reference / "logits.npy")
    prompt = json.loads((reference / "reference.json").read_text())["prompt"]
    try:
        with native_stderr_captured() as log:
            got = run_pte(pte, tokens, prompt, backend)
    except Exception as e:  # a runtime error is a verification failure, not a crash
        tail = " | ".join(log["text"].strip().splitlines()[-3:])
        return {"passed": False, "executed": True,
                "reason": f"runtime error: {e}" + (f" (runtime log: {tail})" if tail else "")}
    return compare(got, ref, tol)


def structural(pte: Path, backend) -> dict:
    from mlxbuild.pte_inspect import inspect_pte

    try:
        info = inspect_pte(pte)
    except Exception as e:
        return {"passed": False, "executed": False, "reason": f"does not deserialize: {e}"}
    return backend.check_structure(info)
