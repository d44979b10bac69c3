"""The nodes a decoder-only LLM lowered to MLX uses (the tiny Qwen3 artifacts and
their larger siblings): integer bookkeeping on value slots, elementwise math,
reductions, norms, RoPE, attention, matmuls (dense and quantized), quantized
embedding lookups, shape ops and the KV-cache slice update.

Semantics follow ExecuTorch's ``MLXInterpreter.h``. Other modules of this package
may implement some of the same node types; theirs win: this module imports its
siblings first and registers only the names still free (``_soft``).
"""

from __future__ import annotations

import importlib
import pkgutil

import mlx.core as mx

from ..registry import HANDLERS

# Import the sibling families first so their handlers are registered before ours.
_package = __name__.rsplit(".", 1)[0]
for _info in pkgutil.iter_modules(importlib.import_module(_package).__path__):
    if _info.name != __name__.rsplit(".", 1)[1]:
        try:
            importlib.import_module(f"{_package}.{_info.name}")
        except Exception:  # noqa: BLE001 - the package __init__ re-imports it and reports the error
            pass

INT32_MAX, INT32_MIN = 2**31 - 1, -(2**31)
MINE: dict[str, object] = {}


def _soft(*names: str):
    """Register ``fn`` for each name no other module handles yet."""

    def register(fn):
        for name in names:
            MINE[name] = fn
            HANDLERS.setdefault(name, fn)
        return fn

    return register


def _text(v) -> str:
    return v.decode() if isinstance(v, (bytes, bytearray)) else (v or "")


def _ints(v) -> list[int]:
    return [] if v is None else [int(x) for x in v]


def _axis(axis: int, ndim: int, what: str) -> int:
    if not -ndim <= axis < max(ndim, 1):
        raise IndexError(f"{what}: axis {axis} out of range for rank {ndim}")
    return axis + ndim if axis < 0 else axis


def _opt(frame, tid):
    return None if tid is None else frame.t(tid)


def _int32(v: int, what: str) -> int:
    if not INT32_MIN <= v <= INT32_MAX:
        raise OverflowError(f"{what}: int32 overflow ({v})")
    return v


# -- value slots: integer arithmetic on symbolic sizes -------------------------------


@_soft("SymSizeNode")
def sym_size(frame, node):
    a = frame.t(node.a)
    frame.set_v(node.out, int(a.shape[_axis(int(node.dim), a.ndim, "SymSize")]))


@_soft("ItemIntNode")
def item_int(frame, node):
    # A host value: evaluates this one scalar (the C++ runtime syncs here too).
    frame.set_v(node.out, int(frame.t(node.x).item()))


@_soft("AddIntNode")
def add_int(frame, node):
    frame.set_v(node.out, _int32(frame.int_(node.a) + frame.int_(node.b), "AddInt"))


@_soft("SubtractIntNode")
def subtract_int(frame, node):
    frame.set_v(node.out, _int32(frame.int_(node.a) - frame.int_(node.b), "SubtractInt"))


@_soft("MultiplyIntNode")
def multiply_int(frame, node):
    frame.set_v(node.out, _int32(frame.int_(node.a) * frame.int_(node.b), "MultiplyInt"))


@_soft("FloorDivideIntNode")
def floor_divide_int(frame, node):
    b = frame.int_(node.b)
    if b == 0:
        raise ZeroDivisionError("FloorDivideInt: division by zero")
    frame.set_v(node.out, _int32(frame.int_(node.a) // b, "FloorDivideInt"))  # Python floor semantics


@_soft("ModIntNode")
def mod_int(frame, node):
    b = frame.int_(node.b)
    if b == 0:
        raise ZeroDivisionError("ModInt: division by zero")
    frame.set_v(node.out, frame.int_(node.a) % b)  # sign of the divisor, as Python


# -- tensor creation and casts ------------------------------------------------------


@_soft("ARangeNode")
def arange(frame, node):
    start, stop, step = frame.int_(node.start), frame.int_(node.stop), frame.int_(node.step)
    if step == 0:
        raise ValueError("ARange: step must not be zero")
    st = getattr(node, "scalarType", None)
    dtype = mx.int32 if st is None else frame.dtype(st)
    frame.set_t(node.out, mx.arange(start, stop, step, dtype=dtype))


@_soft("FullNode")
def full(frame, node):
    shape = [frame.int_(d) for d in (node.shape or [])]
    frame.set_t(node.out, mx.full(shape, frame.float_(node.v), dtype=frame.dtype(node.scalarType)))


@_soft("FullLikeNode")
def full_like(frame, node):
    x = frame.t(node.x)
    st = getattr(node, "scalarType", None)
    dtype = x.dtype if st is None else frame.dtype(st)
    frame.set_t(node.out, mx.full(x.shape, frame.float_(node.v), dtype=dtype))


@_soft("AsTypeNode")
def astype(frame, node):
    frame.set_t(node.out, frame.t(node.x).astype(frame.dtype(node.scalarType)))


# -- elementwise ---------------------------------------------------------------------


def _binary(fn):
    def handler(frame, node):
        frame.set_t(node.out, fn(frame.t(node.a), frame.t(node.b)))

    return handler


def _unary(fn):
    def handler(frame, node):
        frame.set_t(node.out, fn(frame.t(node.x)))

    return handler


for _name, _fn in {
    "AddNode": mx.add, "SubtractNode": mx.subtract, "MultiplyNode": mx.multiply, "DivideNode": mx.divide,
    "MaximumNode": mx.maximum, "MinimumNode": mx.minimum, "PowerNode": mx.power,
    "EqualNode": mx.equal, "NotEqualNode": mx.not_equal, "LessNode": mx.less, "LessEqualNode": mx.less_equal,
    "GreaterNode": mx.greater, "GreaterEqualNode": mx.greater_equal,
    "LogicalAndNode": mx.logical_and, "LogicalOrNode": mx.logical_or,
}.items():
    _soft(_name)(_binary(_fn))

for _name, _fn in {
    "NegNode": mx.negative, "ExpNode": mx.exp, "LogNode": mx.log, "SqrtNode": mx.sqrt, "RsqrtNode": mx.rsqrt,
    "SinNode": mx.sin, "CosNode": mx.cos, "TanhNode": mx.tanh, "SigmoidNode": mx.sigmoid, "AbsNode": mx.abs,
    "SquareNode": mx.square, "ReciprocalNode": mx.reciprocal, "LogicalNotNode": mx.logical_not,
    "SiluNode": lambda x: x * mx.sigmoid(x),
}.items():
    _soft(_name)(_unary(_fn))


@_soft("GeluNode")
def gelu(frame, node):
    x = frame.t(node.x)
    if _text(node.approximate) == "tanh":
        inner = 0.7978845608 * (x + 0.044715 * x * x * x)
        out = 0.5 * x * (1 + mx.tanh(inner.astype(x.dtype)))
    else:
        out = 0.5 * x * (1 + mx.erf(x * 0.7071067812))
    frame.set_t(node.out, out.astype(x.dtype))


@_soft("WhereNode")
def where(frame, node):
    frame.set_t(node.out, mx.where(frame.t(node.condition), frame.t(node.x), frame.t(node.y)))


@_soft("SoftmaxNode")
def softmax(frame, node):
    frame.set_t(node.out, mx.softmax(frame.t(node.x), axis=int(node.axis), precise=bool(node.precise)))


# -- reductions ------------------------------------------------------------------------


def _reduce(fn):
    def handler(frame, node):
        x, axes = frame.t(node.x), _ints(node.axes)
        keep = bool(node.keepdims)
        frame.set_t(node.out, fn(x, keepdims=keep) if not axes else fn(x, axis=axes, keepdims=keep))

    return handler


for _name, _fn in {"SumNode": mx.sum, "MeanNode": mx.mean, "MaxNode": mx.max, "MinNode": mx.min,
                   "ProdNode": mx.prod}.items():
    _soft(_name)(_reduce(_fn))


@_soft("ArgmaxNode")
def argmax(frame, node):
    frame.set_t(node.out, mx.argmax(frame.t(node.x), axis=int(node.axis), keepdims=bool(node.keepdims)))


# -- norms, rotary embedding, attention ---------------------------------------------------


@_soft("RMSNormNode")
def rms_norm(frame, node):
    frame.set_t(node.out, mx.fast.rms_norm(frame.t(node.x), _opt(frame, node.weight), float(node.eps)))


@_soft("LayerNormNode")
def layer_norm(frame, node):
    frame.set_t(node.out, mx.fast.layer_norm(frame.t(node.x), _opt(frame, node.weight), _opt(frame, node.bias),
                                             float(node.eps)))


@_soft("RopeNode")
def rope(frame, node):
    freqs = _opt(frame, node.freqs)
    offset = frame.vid_or_tid(node.offset)
    if not isinstance(offset, mx.array):
        offset = int(offset)
    frame.set_t(node.out, mx.fast.rope(frame.t(node.x), int(node.dims), traditional=bool(node.traditional),
                                       base=None if freqs is not None else float(node.base),
                                       scale=float(node.scale), offset=offset, freqs=freqs))


@_soft("SdpaNode")
def sdpa(frame, node):
    q, k, v = frame.t(node.q), frame.t(node.k), frame.t(node.v)
    mask = None
    if node.mask is not None:
        mask = frame.t(node.mask)
        if mask.dtype != mx.bool_ and mask.dtype != q.dtype:
            mask = mask.astype(q.dtype)
    if node.causal:
        if mask is not None:
            raise ValueError("Sdpa: both a mask tensor and causal=True")
        mask = "causal"
    frame.set_t(node.out, mx.fast.scaled_dot_product_attention(q, k, v, scale=float(node.scale), mask=mask))


# -- matmuls ---------------------------------------------------------------------------


@_soft("AddmmNode")
def addmm(frame, node):
    a, b = frame.t(node.mat1), frame.t(node.mat2)
    alpha, beta = float(node.alpha), float(node.beta)
    if node.bias is None:
        out = mx.matmul(a, b)
        frame.set_t(node.out, out if alpha == 1.0 else out * alpha)
    else:
        frame.set_t(node.out, mx.addmm(frame.t(node.bias), a, b, alpha=alpha, beta=beta))


@_soft("QuantizedMatmulNode")
def quantized_matmul(frame, node):
    frame.set_t(node.out, mx.quantized_matmul(
        frame.t(node.x), frame.t(node.w), frame.t(node.scales), _opt(frame, node.biases),
        transpose=bool(node.transpose), group_size=int(node.groupSize), bits=int(node.bits),
        mode=_text(node.mode) or "affine"))


@_soft("DequantizeNode")
def dequantize(frame, node):
    dtype = None if node.dtype is None else frame.dtype(node.dtype)
    frame.set_t(node.out, mx.dequantize(
        frame.t(node.w), frame.t(node.scales), _opt(frame, node.biases), group_size=int(node.groupSize),
        bits=int(node.bits), mode=_text(node.mode) or "affine", global_scale=_opt(frame, node.globalScale),
        dtype=dtype))


# -- shapes and indexing -----------------------------------------------------------------


@_soft("IdCopyNode")
def id_copy(frame, node):
    frame.set_t(node.out, frame.t(node.x))


@_soft("ReshapeNode")
def reshape(frame, node):
    frame.set_t(node.out, mx.reshape(frame.t(node.x), [frame.int_(d) for d in node.shape]))


@_soft("TransposeNode")
def transpose(frame, node):
    frame.set_t(node.out, mx.transpose(frame.t(node.x), _ints(node.perm)))


@_soft("ExpandDimsNode")
def expand_dims(frame, node):
    frame.set_t(node.out, mx.expand_dims(frame.t(node.x), int(node.axis)))


@_soft("ConcatenateNode")
def concatenate(frame, node):
    frame.set_t(node.out, mx.concatenate([frame.t(t) for t in node.tensors], axis=int(node.axis)))


@_soft("ContiguousNode")
def contiguous(frame, node):
    frame.set_t(node.out, mx.contiguous(frame.t(node.x)))


def _along(ndim: int, axis: int, index) -> tuple:
    return tuple(index if i == axis else slice(None) for i in range(ndim))


@_soft("TakeNode")
def take(frame, node):
    x = frame.t(node.x)
    axis = _axis(int(node.axis), x.ndim, "Take")
    index = frame.int_vid_tid(node.index)
    if isinstance(index, mx.array):
        frame.set_t(node.out, mx.take(x, index, axis=axis))
        return
    size = x.shape[axis]
    if not -size <= index < size:
        raise IndexError(f"Take: index {index} out of range for size {size}")
    frame.set_t(node.out, mx.take(x, index % size, axis=axis))


@_soft("SliceNode")
def slice_(frame, node):
    x = frame.t(node.x)
    axis = _axis(frame.int_(node.axis), x.ndim, "Slice")
    step = int(node.step)
    if step == 0:
        raise ValueError("Slice: step must not be 0")
    frame.set_t(node.out, x[_along(x.ndim, axis, slice(frame.int_(node.start), frame.int_(node.stop), step))])


@_soft("SliceUpdateNode")
def slice_update(frame, node):
    # The KV-cache write: dst[..., start:stop:step, ...] = update, functionally.
    dst, upd = frame.t(node.dst), frame.t(node.update)
    axis = _axis(frame.int_(node.axis), dst.ndim, "SliceUpdate")
    step = int(node.step)
    if step < 1:
        raise ValueError(f"SliceUpdate: step must be >= 1, got {step}")
    dim = dst.shape[axis]
    start, stop = frame.int_(node.start), frame.int_(node.stop)
    start = min(max(start + dim if start < 0 else start, 0), dim)
    stop = min(max(stop + dim if stop < 0 else stop, 0), dim)
    if start >= stop:
        frame.set_t(node.out, dst)
        return
    if upd.dtype != dst.dtype:
        upd = upd.astype(dst.dtype)
    if step == 1:
        out = mx.slice_update(dst, upd, mx.array([start], dtype=mx.int32), [axis])
    else:
        idx = mx.arange(start, stop, step, dtype=mx.int32)
        shape = [1] * dst.ndim
        shape[axis] = idx.size
        target = list(upd.shape)
        target[axis] = idx.size
        out = mx.put_along_axis(dst, mx.broadcast_to(idx.reshape(shape), target), upd, axis=axis)
    frame.set_t(node.out, out)
