"""Reductions: Sum, Mean, Var, Std, Prod, Max, Min, Argmax, Argmin, Median,
LogSumExp, Softmax, Any, All, Cumsum.

``axes`` empty means "reduce all" (as in the C++ runtime and in torch's
``sum(x, dim=[])``); negative axes are passed through (MLX normalizes them).
Where ``mlx.core`` and torch disagree the handler follows torch:

- Sum, Prod and Cumsum of integers or bools give int64 (torch's default), not the
  input dtype; Argmax/Argmin give int64, not MLX's uint32.
- Reductions over fp16/bf16 accumulate in float32 and round once at the end, as
  torch's CPU kernels do; MLX's Cumsum would otherwise accumulate in the half type
  (a bf16 running sum of 100000 * 0.1 stalls at 32).
- Softmax of half inputs uses MLX's precise (float32) path whatever ``precise``
  says; torch's ``_softmax`` computes in float32 as well.
- Any/All of uint8 return uint8, as torch does; bool otherwise.
- Cumsum: the lowering drops ``cumsum(..., dtype=)``; when the output slot has
  tensor metadata (graph outputs) its dtype is honoured.

Median follows ExecuTorch's C++ runtime (``mlx::median``: the mean of the two
middle values for an even count). No ATen op lowers to it; note that
``torch.median`` returns the lower middle value instead.
"""

from __future__ import annotations

import mlx.core as mx

from ..registry import handles
from .elementwise import meta_dtype

_HALF = (mx.float16, mx.bfloat16)


def _is_float(dt) -> bool:
    return mx.issubdtype(dt, mx.floating)


def _axes(node):
    axes = node.axes
    if axes is None or len(axes) == 0:
        return None
    return [int(a) for a in axes]


def _keepdims(node) -> bool:
    return bool(node.keepdims)


def _accumulate(x: mx.array) -> tuple[mx.array, object]:
    """The dtype to compute in, and the dtype of the result (torch semantics)."""
    if x.dtype in _HALF:
        return x.astype(mx.float32), x.dtype
    if not _is_float(x.dtype) and not mx.issubdtype(x.dtype, mx.complexfloating):
        return x.astype(mx.int64), mx.int64
    return x, x.dtype


def _float_accumulate(x: mx.array) -> tuple[mx.array, object]:
    """Like ``_accumulate`` for ops whose result is floating (Mean, Var, Std, LogSumExp)."""
    if x.dtype in _HALF:
        return x.astype(mx.float32), x.dtype
    if not _is_float(x.dtype) and not mx.issubdtype(x.dtype, mx.complexfloating):
        return x.astype(mx.float32), mx.float32
    return x, x.dtype


def _cast(x: mx.array, dt) -> mx.array:
    return x if x.dtype == dt else x.astype(dt)


def _reduce(fn, accumulate):
    def handler(frame, node):
        x, out_dt = accumulate(frame.t(node.x))
        frame.set_t(node.out, _cast(fn(x, axis=_axes(node), keepdims=_keepdims(node)), out_dt))

    return handler


def _identity_acc(x):
    return x, x.dtype


handles("SumNode")(_reduce(mx.sum, _accumulate))
handles("ProdNode")(_reduce(mx.prod, _accumulate))
handles("MeanNode")(_reduce(mx.mean, _float_accumulate))
handles("LogSumExpNode")(_reduce(mx.logsumexp, _float_accumulate))
handles("MaxNode")(_reduce(mx.max, _identity_acc))
handles("MinNode")(_reduce(mx.min, _identity_acc))
handles("MedianNode")(_reduce(mx.median, _identity_acc))


def _moment(fn):
    def handler(frame, node):
        x, out_dt = _float_accumulate(frame.t(node.x))
        out = fn(x, axis=_axes(node), keepdims=_keepdims(node), ddof=int(node.ddof or 0))
        frame.set_t(node.out, _cast(out, out_dt))

    return handler


handles("VarNode")(_moment(mx.var))
handles("StdNode")(_moment(mx.std))


def _logical(fn):
    def handler(frame, node):
        x = frame.t(node.x)
        out = fn(x, axis=_axes(node), keepdims=_keepdims(node))
        frame.set_t(node.out, out.astype(mx.uint8) if x.dtype == mx.uint8 else out)

    return handler


handles("AnyNode")(_logical(mx.any))
handles("AllNode")(_logical(mx.all))


def _arg(fn):
    def handler(frame, node):
        x = frame.t(node.x)
        out = fn(x, axis=int(node.axis), keepdims=_keepdims(node))
        frame.set_t(node.out, out.astype(mx.int64))

    return handler


handles("ArgmaxNode")(_arg(mx.argmax))
handles("ArgminNode")(_arg(mx.argmin))


@handles("SoftmaxNode")
def softmax(frame, node):
    x = frame.t(node.x)
    if not _is_float(x.dtype):
        x = x.astype(mx.float32)
    precise = bool(node.precise) or x.dtype in _HALF
    frame.set_t(node.out, mx.softmax(x, axis=int(node.axis), precise=precise))


@handles("CumsumNode")
def cumsum(frame, node):
    x = frame.t(node.x)
    out_dt = meta_dtype(frame, node.out)
    if out_dt is not None and out_dt != x.dtype:
        x = x.astype(out_dt)  # cumsum(x, dim, dtype=...) casts first, as torch does
    x, out_dt = _accumulate(x)
    reverse = bool(node.reverse)
    inclusive = True if node.inclusive is None else bool(node.inclusive)
    out = mx.cumsum(x, axis=int(node.axis), reverse=reverse, inclusive=inclusive)
    frame.set_t(node.out, _cast(out, out_dt))
