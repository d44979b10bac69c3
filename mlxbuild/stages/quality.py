"""One target's artifact against the unquantized model: its own outputs, through its own
runtime (``backends.open_program``), on the baseline's sequences; then the gate. A target
that misses a threshold fails here (exit 4, the figure and the threshold in one line), so
its package step does not run and the last good artifact stays published.
"""

from __future__ import annotations

from pathlib import Path

import backends
from mlxbuild import families, progress, quality
from mlxbuild.errors import VerificationError
from mlxbuild.steps import BaselineResult, QualityParams, QualityResult


def run(params: QualityParams, cache, out: Path) -> QualityResult:
    import numpy as np

    from backends.et_runtime import native_stderr_captured

    kind = families.get(params.task)
    base = cache.read("baseline", params.baseline)
    info = BaselineResult.read(base)
    tokens = np.load(base / "tokens.npy")
    with native_stderr_captured():
        program = backends.open_program(cache.read("lower", params.lower) / "model.pte", params.backend)
        forward = lambda ids, pos: program.run("forward", [ids, pos])[0]  # noqa: E731
        progress.note(f"scoring {tokens.shape[0]} x {tokens.shape[1]} tokens")
        logits = kind.score(forward, tokens, params.max_prefill_chunk)
        speed = None
        if params.speed:
            progress.note("measuring speed")
            speed = kind.speed(forward, tokens[0], params.max_prefill_chunk, quality.SPEED_RUNS,
                               min(quality.SPEED_DECODE, tokens.shape[1] // 2))
    figures = quality.figures(np.load(base / "logprobs.npy"), logits, tokens, info.text)
    bad = quality.failures(figures, params.gate)
    result = QualityResult(passed=not bad, reason="; ".join(bad), gate=params.gate,
                           runtime=getattr(program, "runs_on", None) or _runtime(params.backend),
                           speed=speed, evaluation=info.model_dump(mode="json"), **figures)
    result.write(out)
    if bad:
        raise VerificationError(f"quality gate: {result.reason}")
    return result


def _runtime(backend: str) -> str:
    return "mlxbuild MLX runtime (mlx.core)" if backend == "mlx" else "executorch.runtime"
