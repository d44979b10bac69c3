"""The unquantized model on the evaluation sequences: the float reference every target's
quality is measured against (``mlxbuild.quality``). One per (weights, dtype, evaluation
inputs), shared by every scheme and backend of that dtype.

Writes ``tokens.npy`` [N, L], ``logprobs.npy`` [N, L, V] (float32 next-token
log-probabilities) and ``baseline.json``.
"""

from __future__ import annotations

from pathlib import Path

from mlxbuild import evaluation, families, progress, quality
from mlxbuild.families.hf import load_model, text_config
from mlxbuild.families.streaming import trim
from mlxbuild.steps import BaselineParams, BaselineResult


def run(params: BaselineParams, cache, out: Path) -> BaselineResult:
    import numpy as np

    kind = families.get(params.task)
    spec = params.evaluation
    tok_dir = cache.read("tokenizer", params.tokenizer) if params.tokenizer else None
    model = load_model(cache.read("weights", params.weights), params.dtype)
    trim()  # what loading freed goes back before the scoring (its peak is the build's, at 0.6B)
    tokens, text = evaluation.tokens(spec, tok_dir, text_config(model).get("vocab_size") or 2)
    progress.note(f"scoring {tokens.shape[0]} x {tokens.shape[1]} tokens")
    forward = kind.eager_forward(model, params.plain())
    np.save(out / "tokens.npy", tokens)
    # Scored and written a sequence at a time: the whole [N, L, V] block would be held twice
    # (logits and log-probabilities, 0.15 GB each at 4 x 64 tokens of a 150k vocabulary).
    quality.save_log_probs(out / "logprobs.npy", _Sequences(kind, forward, tokens, params.max_prefill_chunk))
    dataset = spec.get("dataset") or {}
    source = (f"hf:{dataset['hf']}" if "hf" in dataset else Path(dataset["file"]).name) if text \
        else f"seeded token ids (seed {spec.get('seed', 0)})"
    result = BaselineResult(sequences=int(tokens.shape[0]), seq_len=int(tokens.shape[1]), text=text,
                            source=source)
    result.write(out)
    return result


class _Sequences:
    """Each sequence's logits [L, V], scored when asked for."""

    def __init__(self, kind, forward, tokens, chunk: int):
        self.kind, self.forward, self.tokens, self.chunk = kind, forward, tokens, chunk

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __iter__(self):
        for i in range(len(self)):
            yield self.kind.score(self.forward, self.tokens[i:i + 1], self.chunk)[0]
            trim()
