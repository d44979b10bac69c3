"""What every family's verification shares: comparing logits and tensors with the
reference, and the constant methods every KV-cached decoder carries."""

from __future__ import annotations

import numpy as np


def as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def compare(got: np.ndarray, ref: np.ndarray, tol: dict) -> dict:
    """Logit rows against the reference: error relative to the largest reference logit,
    and top-1 agreement where the reference's winner is clear."""
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


def compare_tensor(got: np.ndarray, ref: np.ndarray, tol: dict) -> dict:
    """A hidden-state output against the reference, relative to its largest value."""
    if got.shape != ref.shape:
        return {"passed": False, "reason": f"shape {got.shape} != reference {ref.shape}"}
    err = float(np.abs(got.astype(np.float32) - ref).max())
    rel = err / (float(np.abs(ref).max()) or 1.0)
    passed = rel <= tol["max_rel_error"]
    return {"passed": passed, "max_abs_error": err, "max_rel_error": rel,
            "reason": "" if passed else f"max abs error {err:.3g} ({rel:.3g} of the largest value, "
                                        f"allowed {tol['max_rel_error']:.3g})"}


def runtime_failure(e: Exception, log: dict) -> dict:
    tail = " | ".join(log["text"].strip().splitlines()[-3:])
    return {"passed": False, "executed": True,
            "reason": f"runtime error: {e}" + (f" (runtime log: {tail})" if tail else "")}


def kv_cache_methods(params: dict) -> dict:
    """Constant methods every runner of a KV-cached decoder reads (LLM and ASR runners alike)."""
    return {
        "get_max_seq_len": params["max_context_length"],
        "get_max_context_len": params["max_context_length"],
        "get_prefill_chunk_size": params["max_prefill_chunk"],
        "use_kv_cache": True,
        "enable_dynamic_shape": params["max_prefill_chunk"] > 1,
    }


def first_parting(got: list, want: list, margins: list, max_abs_error: float, who: str) -> dict | None:
    """Where a runner's tokens first part from eager greedy's: ``None`` if nowhere in their
    common length; else the check's result. They may part only at a near tie of the eager
    model (a top-1 margin within twice the artifact's largest logit error, the rule
    ``compare`` uses for decisive positions); after that the two continue from different
    tokens and are not compared. ``who`` names the runner in the reason."""
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            if margins[i] <= 2 * max_abs_error:
                return {"passed": True, "matched": i,
                        "note": f"parted from eager at token {i} of {len(want)}, a near tie "
                                f"(margin {margins[i]:.3g} <= 2 x {max_abs_error:.3g})"}
            return {"passed": False, "matched": i,
                    "reason": f"{who}'s token {i} is {a!r}, eager greedy gives {b!r} "
                              f"(a decisive choice: margin {margins[i]:.3g})"}
    return None


def export_methods(modules: dict, examples: dict, names) -> dict:
    """``torch.export`` (strict) each of ``names`` with its (example kwargs, dynamic shapes)."""
    import torch

    from mlxbuild import progress

    programs = {}
    with torch.no_grad():
        for name in names:
            progress.note(f"torch.export {name}")
            kwargs, dynamic = examples[name]
            programs[name] = torch.export.export(modules[name], (), kwargs, dynamic_shapes=dynamic, strict=True)
    return programs
