"""How close an artifact's logits must come to the eager model quantized the same way.

Errors are measured relative to the largest reference logit, so one table
serves checkpoints whose logits have very different scales. Top-1 agreement is
only demanded where the reference's top two logits are further apart than the
allowed error: a near-tie may fall either way without anything being wrong.
"""

from __future__ import annotations


# An MLX target's TurboQuant KV cache (``kv_cache: turboquant``) stores keys and values as
# 4-bit codebook indices: the reference keeps them exact, so the logits move by the cache's
# own quantization error. Measured with synthetic weights (their keys have no structure for
# the codebook to fit, the worst case): 0.096 of the largest logit on a 2-layer head_dim-64
# model, 0.17 on 2 layers and 0.19 on 28 layers of Qwen3-0.6B's shapes
# (benchmarks/results/turboquant-2026-12-06.json), top-1 agreement 100% where decisive.
# That the runtime computes ExecuTorch's TurboQuant kernels as ExecuTorch's own ops do is
# tested apart (tests/test_turboquant.py).
TURBOQUANT_REL = 0.3


def active_rules(scheme: dict) -> list[dict]:
    """The rules of a scheme that quantize something (its linear and embedding defaults and
    its per-layer rules)."""
    rules = [scheme.get("linear"), scheme.get("embedding"), *(scheme.get("rules") or [])]
    return [r for r in rules if r and r.get("format", "affine") != "none"]


def tolerance(dtype: str, scheme: dict, kv_cache: str = "static") -> dict:
    """The allowed error for a scheme: the loosest that any of its rules needs.

    A mixed scheme (per-layer ``rules``) is judged by its least precise rule: one
    quantized layer makes the logits those of a quantized model, and one layer with
    dynamic activations brings the int8 kernels' rounding differences. A compressed KV
    cache adds its own error (``TURBOQUANT_REL``).
    """
    active = active_rules(scheme)
    dynamic = any(r.get("activations") == "int8_dynamic" for r in active)
    rel = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 4e-2}[dtype]
    if active:
        rel = max(rel, 1e-3)
    if dynamic:
        # XNNPACK's int8 kernels choose the same per-token activation parameters as
        # torchao's eager path (a linear matches to 3e-7 once the reference uses the
        # scales as XNNPACK stores them: backends/xnnpack.py REFERENCE_SCALES), but the
        # float ops before each linear differ in the last bits, and wherever that crosses
        # a rounding boundary an activation moves by a whole int8 step. Where that adds up
        # past this (wide, deep models), verification judges the artifact against the
        # reference's own rounding (families/common.py PRECISE_MULTIPLIER).
        rel = max(rel, 5e-2)
    if kv_cache == "turboquant":
        rel = max(rel, TURBOQUANT_REL)
    return {"max_rel_error": rel, "min_top1_agreement": 1.0}
