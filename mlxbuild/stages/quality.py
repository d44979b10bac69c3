"""One target's artifact against the unquantized model: its own outputs, through its own
runtime (``backends.open_program``), on the baseline's sequences; then the gate. A target
that misses a threshold fails here (exit 4, the figure and the threshold in one line), so
its package step does not run and the last good artifact stays published.

A mixed-precision scheme also gets figures per rule (``rule_figures``): which of its rules
costs the quality. Those run in eager torch, not through the artifact's runtime: a rule's
layers alone are not a program anyone ships.
"""

from __future__ import annotations

from pathlib import Path

import backends
from mlxbuild import families, progress, quality
from mlxbuild.errors import VerificationError
from mlxbuild.steps import BaselineResult, LowerResult, QualityParams, QualityResult


def run(params: QualityParams, cache, out: Path) -> QualityResult:
    import numpy as np

    from backends.et_runtime import native_stderr_captured

    kind = families.get(params.task)
    base = cache.read("baseline", params.baseline)
    info = BaselineResult.read(base)
    tokens = np.load(base / "tokens.npy")
    with native_stderr_captured():
        lowered = cache.read("lower", params.lower)
        program = backends.open_program(lowered / "model.pte", params.backend, LowerResult.data_files(lowered))
        forward = lambda ids, pos: program.run("forward", [ids, pos])[0]  # noqa: E731
        progress.note(f"scoring {tokens.shape[0]} x {tokens.shape[1]} tokens")
        logits = kind.score(forward, tokens, params.max_prefill_chunk)
        speed = None
        if params.speed:
            progress.note("measuring speed")
            speed = kind.speed(forward, tokens[0], params.max_prefill_chunk, quality.SPEED_RUNS,
                               min(quality.SPEED_DECODE, tokens.shape[1] // 2))
    float_logp = np.load(base / "logprobs.npy")
    figures = quality.figures(float_logp, logits, tokens, info.text)
    rules = rule_figures(params, cache, float_logp, tokens, info.text) if params.rules else None
    bad = quality.failures(figures, params.gate)
    result = QualityResult(passed=not bad, reason="; ".join(bad), gate=params.gate,
                           runtime=getattr(program, "runs_on", None) or _runtime(params.backend),
                           speed=speed, evaluation=info.model_dump(mode="json"), rules=rules, **figures)
    result.write(out)
    if bad:
        raise VerificationError(f"quality gate: {result.reason}")
    return result


def rule_figures(params: QualityParams, cache, float_logp, tokens, text: bool) -> dict[str, dict]:
    """{rule: figures} for each rule of a mixed scheme that quantizes something: the eager
    float model with only that rule's layers quantized as the scheme says, scored like the
    artifact. Rounding is the scheme's (HQQ); GPTQ and AWQ, which fit each layer to what the
    quantized layers before it produce, apply to the whole scheme only, so a calibrated
    scheme's rules are measured with plain rounding (``method`` says so)."""
    from mlxbuild.families.hf import load_model
    from mlxbuild.quantize import apply_scheme, assign_rules, describe_rule

    spec = params.rules
    kind = families.get(params.task)
    scheme = {k: v for k, v in spec.scheme.items() if k not in ("method", "calibration")}
    weights = cache.read("weights", spec.weights)
    export = {"max_context_length": spec.max_context_length}
    described = {f"rules[{i}]": describe_rule(i, r) for i, r in enumerate(scheme.get("rules") or [])}
    model = load_model(weights, spec.dtype)
    by_rule: dict[str, list[str]] = {}
    for name, (_kind, rule, q) in assign_rules(model, scheme).items():
        if q["format"] != "none":
            by_rule.setdefault(rule, []).append(name)
    out = {}
    for rule, names in by_rule.items():
        progress.note(f"rule {rule} on its own ({len(names)} layers)")
        model = model or load_model(weights, spec.dtype)  # each rule on a fresh float model
        layers = apply_scheme(model, scheme, only=set(names))
        logits = kind.score(kind.eager_forward(model, export), tokens, params.max_prefill_chunk)
        model = None
        quantized = [layers[n] for n in names if layers[n]["format"] != "none"]
        out[rule] = {"rule": described.get(rule, rule),
                     "layers": len(quantized), "quantization": _short(quantized[0]) if quantized else "none",
                     "method": "rtn" if spec.scheme.get("method", "rtn") != "rtn" else None,
                     **quality.figures(float_logp, logits, tokens, text)}
    return out


def _short(q: dict) -> str:
    if q["format"] != "affine":
        return q["format"]
    act = "" if q.get("activations", "none") == "none" else f", {q['activations']} activations"
    return f"{q['bits']}-bit, group {q['group_size']}{act}"


def _runtime(backend: str) -> str:
    return "mlxbuild MLX runtime (mlx.core)" if backend == "mlx" else "executorch.runtime"
