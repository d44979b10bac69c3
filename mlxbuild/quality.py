"""What quantization cost: an artifact's next-token distributions against the unquantized
model's on the same evaluation sequences, and the gate a target must pass to be published.

Verification proves a lowering is faithful to the eager model *quantized the same way*;
this module measures the quantized artifact against the float model of the same
checkpoint (the ``baseline`` step) and so says whether the quantized model is any good.

Figures (over every scored position of every sequence):
- ``kld_mean`` / ``kld_p99``: KL(float ‖ artifact) of the next-token distributions, in nats;
- ``top1``: how often the artifact's most likely next token is the float model's;
  ``top1_decisive`` the same over the positions where the float model does not nearly tie
  (``DECISIVE_MARGIN``), which is what the gate's ``min_top1`` holds;
- ``ppl_float`` / ``ppl`` / ``ppl_increase``: perplexity of the evaluation text under both
  and the relative increase (only when the sequences are tokenized text).

Torch-free at import (the plan reads the default thresholds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The evaluation text when a manifest names none: English prose about building and
# shipping models, written for mlxbuild (not the synthetic tokenizer's training corpus).
DEFAULT_TEXT = Path(__file__).parent / "data" / "eval.txt"

# The gate a target meets unless the manifest says otherwise, by the narrowest weight
# width its scheme uses (``none``: an unquantized target, which differs from the float
# model by its dtype and runtime only). Chosen from what the published KL figures of
# llama.cpp and mlx-lm quantizations of 0.5B-8B models span (8-bit ~0.001-0.005 nats,
# 4-bit group-wise ~0.02-0.1, 2-bit ~0.5 and up), with room for small models, which lose
# more per bit. A team tightens them per scheme or target.
DEFAULT_GATES: dict[str, dict[str, float]] = {
    "none": {"max_kld": 0.01, "min_top1": 0.95, "max_ppl_increase": 0.02},
    "8": {"max_kld": 0.05, "min_top1": 0.90, "max_ppl_increase": 0.05},
    "4": {"max_kld": 0.25, "min_top1": 0.75, "max_ppl_increase": 0.30},
    "2": {"max_kld": 1.50, "min_top1": 0.40, "max_ppl_increase": 2.00},
}
FIELDS = ("max_kld", "min_top1", "max_ppl_increase")
# The top-1 gate counts the positions where the float model's top two next tokens are at
# least this far apart in log-probability (nats): where they nearly tie, either pick is as
# good, and a rounding that swaps them says nothing about quality. Untrained or tiny models
# are mostly ties; trained ones mostly are not.
DECISIVE_MARGIN = 0.1

# Evaluation inputs unless the manifest's ``quality:`` says otherwise.
DEFAULT_SEQUENCES = 4
DEFAULT_SEQ_LEN = 64
SPEED_RUNS = 3  # timed runs per figure; the median is recorded
SPEED_DECODE = 16  # single-token steps per decode run


def narrowest_bits(scheme: dict) -> str:
    """The narrowest weight width a scheme quantizes any layer to ("none" if it quantizes
    nothing): what picks its default gate. nvfp4 and cuda_int4 are 4-bit."""
    widths = []
    for q in [scheme.get("linear"), scheme.get("embedding"), *(scheme.get("rules") or [])]:
        if not q or q.get("format", "affine") == "none":
            continue
        widths.append(int(q.get("bits") or 4) if q.get("format", "affine") == "affine" else 4)
    return str(min(widths)) if widths else "none"


def thresholds(scheme: dict, *overrides: dict | None) -> dict[str, float | None]:
    """The gate of one target: the default for its scheme's narrowest width, then each
    override in turn (manifest-wide, per scheme, per target), field by field."""
    gate: dict[str, Any] = dict(DEFAULT_GATES[narrowest_bits(scheme)])
    for o in overrides:
        for k in FIELDS:
            if o and o.get(k) is not None:
                gate[k] = o[k]
    return gate


def log_softmax(logits):
    import numpy as np

    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


# Rows of [L, V] worked on at once in float64: at a 150k vocabulary each row is 1.2 MB and
# the arithmetic holds a few copies, so a whole 64-token sequence would be ~0.3 GB.
ROWS = 16


def log_probs(logits):
    """``log_softmax`` of [L, V] logits as float32, ``ROWS`` rows at a time (each row is
    computed alone, so the values are those of the whole block)."""
    import numpy as np

    return np.concatenate([log_softmax(logits[r:r + ROWS]).astype(np.float32)
                           for r in range(0, logits.shape[0], ROWS)])


def save_log_probs(path: Path, sequences) -> None:
    """Write an ``.npy`` of [N, L, V] float32 log-probabilities from an iterable of N [L, V]
    logit blocks, each written as it comes, so only one block is ever held. ``N`` is
    ``len(sequences)``."""
    import numpy as np

    with open(path, "wb") as f:
        for i, logits in enumerate(sequences):
            rows = log_probs(logits)
            if i == 0:
                np.lib.format.write_array_header_1_0(f, {
                    "descr": np.lib.format.dtype_to_descr(rows.dtype), "fortran_order": False,
                    "shape": (len(sequences), *rows.shape)})
            f.write(np.ascontiguousarray(rows).tobytes())


def figures(float_logp, logits, tokens, text: bool) -> dict:
    """Figures of ``logits`` [N, L, V] (the artifact's) against ``float_logp`` [N, L, V] (the
    float model's log-probabilities) on ``tokens`` [N, L]; perplexity only for text. In
    float64, ``ROWS`` positions at a time."""
    import numpy as np

    kld, agree, decisive, nll_f, nll_q = [], [], [], [], []
    n, length = logits.shape[:2]
    for i in range(n):
        for r in range(0, length, ROWS):
            p_log = float_logp[i, r:r + ROWS].astype(np.float64)
            q_log = log_softmax(logits[i, r:r + ROWS])
            # rounding leaves tiny negatives where the two agree
            kld.append(np.maximum((np.exp(p_log) * (p_log - q_log)).sum(axis=-1), 0.0))
            agree.append(p_log.argmax(-1) == q_log.argmax(-1))
            top2 = np.partition(p_log, -2, axis=-1)[:, -2:]
            decisive.append(np.abs(top2[:, 1] - top2[:, 0]) >= DECISIVE_MARGIN)
            if text:
                # Row t predicts token t+1: the last row predicts nothing here.
                nxt = tokens[i, r + 1:r + ROWS + 1, None]
                k = nxt.shape[0]
                nll_f.append(-np.take_along_axis(p_log[:k], nxt, -1))
                nll_q.append(-np.take_along_axis(q_log[:k], nxt, -1))
    kld, agree, decisive = np.concatenate(kld), np.concatenate(agree), np.concatenate(decisive)
    out = {"positions": int(kld.size), "kld_mean": float(kld.mean()),
           "kld_p99": float(np.percentile(kld, 99)), "top1": float(agree.mean()),
           "decisive_positions": int(decisive.sum()),
           "top1_decisive": float(agree[decisive].mean()) if decisive.any() else None}
    if text:
        f, q = float(np.concatenate(nll_f).mean()), float(np.concatenate(nll_q).mean())
        out.update(ppl_float=float(np.exp(f)), ppl=float(np.exp(q)), ppl_increase=float(np.exp(q - f) - 1.0))
    return out


def failures(fig: dict, gate: dict) -> list[str]:
    """Each threshold the figures miss, as 'figure value > threshold'."""
    bad = []
    if gate.get("max_kld") is not None and fig["kld_mean"] > gate["max_kld"]:
        bad.append(f"KL divergence {fig['kld_mean']:.4g} > max_kld {gate['max_kld']:g}")
    top1 = fig.get("top1_decisive")
    if gate.get("min_top1") is not None and top1 is not None and top1 < gate["min_top1"]:
        bad.append(f"top-1 agreement {top1:.4g} (at the {fig['decisive_positions']} decisive positions) "
                   f"< min_top1 {gate['min_top1']:g}")
    if gate.get("max_ppl_increase") is not None and fig.get("ppl_increase") is not None \
            and fig["ppl_increase"] > gate["max_ppl_increase"]:
        bad.append(f"perplexity increase {fig['ppl_increase']:.4g} > max_ppl_increase "
                   f"{gate['max_ppl_increase']:g}")
    return bad
