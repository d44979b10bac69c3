"""Norms, rotary embedding and attention: the transformer-block nodes, on mlx.fast kernels.

Semantics follow ExecuTorch's ``MLXInterpreter.h``.
"""

from __future__ import annotations

import mlx.core as mx

from ..registry import handles


def _opt(frame, tid):
    return None if tid is None else frame.t(tid)


@handles("RMSNormNode")
def rms_norm(frame, node):
    frame.set_t(node.out, mx.fast.rms_norm(frame.t(node.x), _opt(frame, node.weight), float(node.eps)))


@handles("LayerNormNode")
def layer_norm(frame, node):
    frame.set_t(node.out, mx.fast.layer_norm(frame.t(node.x), _opt(frame, node.weight),
                                             _opt(frame, node.bias), float(node.eps)))


@handles("RopeNode")
def rope(frame, node):
    freqs = _opt(frame, node.freqs)
    offset = frame.vid_or_tid(node.offset)
    if not isinstance(offset, mx.array):
        offset = int(offset)
    # A payload carries either precomputed frequencies or a base, never both.
    frame.set_t(node.out, mx.fast.rope(frame.t(node.x), int(node.dims), traditional=bool(node.traditional),
                                       base=None if freqs is not None else float(node.base),
                                       scale=float(node.scale), offset=offset, freqs=freqs))


@handles("SdpaNode")
def sdpa(frame, node):
    q, k, v = frame.t(node.q), frame.t(node.k), frame.t(node.v)
    mask = None
    if node.mask is not None:
        mask = frame.t(node.mask)
        if mask.dtype != mx.bool_ and mask.dtype != q.dtype:
            mask = mask.astype(q.dtype)  # an additive mask must match the scores' dtype
    if node.causal:
        if mask is not None:
            raise ValueError("Sdpa: both a mask tensor and causal=True")
        mask = "causal"
    frame.set_t(node.out, mx.fast.scaled_dot_product_attention(q, k, v, scale=float(node.scale), mask=mask))
