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
- Zero-size inputs give torch's empty-reduction values (sum 0, prod 1, mean/var/std
  nan, logsumexp -inf, any False, all True; max/min/arg* raise unless the result is
  empty too) without calling MLX, whose CPU reduction of a zero-size array can hang
  in ``mx.eval`` (MLX 0.32.4; roughly one eval in 10^4-10^5).

Median follows ExecuTorch's C++ runtime (``mlx::median``: the mean of the two
middle values for an even count). No ATen op lowers to it; note that
``torch.median`` returns the lower middle value instead.
"""

from __future__ import annotations

import math

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


def _accumulate(x: mx.array, integer_result=mx.int64) -> tuple[mx.array, object]:
    """The dtype to compute in, and the dtype of the result (torch semantics): half types
    accumulate in float32, integers in ``integer_result`` (int64 for Sum/Prod/Cumsum)."""
    if x.dtype in _HALF:
        return x.astype(mx.float32), x.dtype
    if not _is_float(x.dtype) and not mx.issubdtype(x.dtype, mx.complexfloating):
        return x.astype(integer_result), integer_result
    return x, x.dtype


def _float_accumulate(x: mx.array) -> tuple[mx.array, object]:
    """For ops whose result is floating (Mean, Var, Std, LogSumExp)."""
    return _accumulate(x, mx.float32)


def _cast(x: mx.array, dt) -> mx.array:
    return x if x.dtype == dt else x.astype(dt)


def _out_shape(shape, axes, keepdims) -> list[int]:
    nd = len(shape)
    red = set(range(nd)) if axes is None else {a + nd if a < 0 else a for a in axes}
    for a in red:
        if not 0 <= a < max(nd, 1):
            raise IndexError(f"reduction axis out of range for rank {nd}")
    return [1 if i in red else d for i, d in enumerate(shape) if keepdims or i not in red]


def _reduced(name, fn, x, axes, keepdims, empty, **kw):
    """``fn(x, axis=axes, keepdims=keepdims)``, except on an empty input: MLX 0.32's
    CPU reduction of a zero-size array (``sum`` of a (3, 0) array over its last axis)
    intermittently never finishes in ``mx.eval``, so the result is built directly,
    with torch's value for an empty reduction (``empty``; None: torch raises)."""
    if x.size:
        return fn(x, axis=axes, keepdims=keepdims, **kw)
    shape = _out_shape(x.shape, [axes] if isinstance(axes, int) else axes, keepdims)
    if empty is None and math.prod(shape):
        raise ValueError(f"{name}: reduction over a zero-size dimension has no identity (torch raises)")
    return mx.full(shape, 0 if empty is None else empty, dtype=x.dtype)


def _reduce(name, fn, accumulate, empty):
    def handler(frame, node):
        x, out_dt = accumulate(frame.t(node.x))
        out = _reduced(name, fn, x, _axes(node), _keepdims(node), empty)
        frame.set_t(node.out, _cast(out, out_dt))

    return handler


def _identity_acc(x):
    return x, x.dtype


_NAN, _NEG_INF = float("nan"), float("-inf")

for _name, _fn, _acc, _empty in [("SumNode", mx.sum, _accumulate, 0), ("ProdNode", mx.prod, _accumulate, 1),
                                  ("MeanNode", mx.mean, _float_accumulate, _NAN),
                                  ("LogSumExpNode", mx.logsumexp, _float_accumulate, _NEG_INF),
                                  ("MaxNode", mx.max, _identity_acc, None), ("MinNode", mx.min, _identity_acc, None),
                                  ("MedianNode", mx.median, _identity_acc, None)]:
    handles(_name)(_reduce(_name, _fn, _acc, _empty))


def _moment(name, fn):
    def handler(frame, node):
        x, out_dt = _float_accumulate(frame.t(node.x))
        out = _reduced(name, fn, x, _axes(node), _keepdims(node), _NAN, ddof=int(node.ddof or 0))
        frame.set_t(node.out, _cast(out, out_dt))

    return handler


handles("VarNode")(_moment("VarNode", mx.var))
handles("StdNode")(_moment("StdNode", mx.std))


def _logical(name, fn, empty):
    def handler(frame, node):
        x = frame.t(node.x)
        out = _reduced(name, fn, x, _axes(node), _keepdims(node), empty)
        out = out.astype(mx.bool_) if out.dtype != mx.bool_ else out
        frame.set_t(node.out, out.astype(mx.uint8) if x.dtype == mx.uint8 else out)

    return handler


handles("AnyNode")(_logical("AnyNode", mx.any, False))
handles("AllNode")(_logical("AllNode", mx.all, True))


def _arg(name, fn):
    def handler(frame, node):
        x = frame.t(node.x)
        out = _reduced(name, fn, x, int(node.axis), _keepdims(node), None)
        frame.set_t(node.out, out.astype(mx.int64))

    return handler


handles("ArgmaxNode")(_arg("ArgmaxNode", mx.argmax))
handles("ArgminNode")(_arg("ArgminNode", mx.argmin))


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
