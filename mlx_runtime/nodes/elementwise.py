"""Element-wise nodes: unary math, binary math and comparisons, Where, Clip, AsType,
Full/FullLike/ARange, and the scalar int ops on value slots (AddInt ... SymSize).

The artifact must compute what the torch model computes, so where ``mlx.core``
and torch disagree the handler follows torch:

- Output dtype of binary ops follows ``torch.result_type``: MLX already promotes
  like torch between tensors of equal standing, but torch lets a dimensioned
  tensor win over a 0-d one of the same category (``fp16[n] + fp32[]`` is fp16),
  which MLX does not (``_promote``).
- True division, Atan2 and LogAddExp of integers give float32 (torch's default
  dtype).
- FloorDivide of floats uses torch's ``div_floor`` (``a - fmod(a, b)`` divided by
  ``b``, rounded), not ``floor(a / b)``: ``1 // 0.1`` is 9 in torch, 10 in MLX.
  Integer FloorDivide and Remainder (both signs) already match torch/Python in
  MLX >= 0.32 (floor rounding; remainder takes the divisor's sign).
- Gelu and Silu on fp16/bf16 are computed in float32 and rounded once, as torch's
  CPU kernels do (opmath), not in the half type.
- Full: the lowering records float32 for ``full(shape, v)`` without ``dtype=``
  (torch infers int64/bool from an int/bool fill); a graph-output slot's recorded
  dtype wins (temporaries have none, so there the lowering's float32 stays).
"""

from __future__ import annotations

import math

import mlx.core as mx

from ..registry import handles

# --------------------------------------------------------------------------- dtypes

_HALF = (mx.float16, mx.bfloat16)


def _is_float(dt) -> bool:
    return mx.issubdtype(dt, mx.floating)


def _is_complex(dt) -> bool:
    return mx.issubdtype(dt, mx.complexfloating)


def _combine(higher, lower):
    """torch's ``combine_categories``: the dtype of a higher-priority operand group
    (dimensioned tensors) wins unless a lower one (0-d tensors) is of a higher
    category (bool < integer < floating < complex)."""
    if _is_complex(higher):
        return higher
    if _is_complex(lower):
        return mx.result_type(higher, lower)
    if _is_float(higher):
        return higher
    if higher == mx.bool_ or _is_float(lower):
        return mx.result_type(higher, lower)
    return higher


def torch_result_type(*arrays: mx.array):
    """``torch.result_type`` over tensors (0-d arrays stand for 0-d tensors)."""
    dim = zero = None
    for x in arrays:
        if x.ndim:
            dim = x.dtype if dim is None else mx.result_type(dim, x.dtype)
        else:
            zero = x.dtype if zero is None else mx.result_type(zero, x.dtype)
    if dim is None:
        return zero
    if zero is None:
        return dim
    return _combine(dim, zero)


def _promote(*arrays: mx.array) -> list[mx.array]:
    dt = torch_result_type(*arrays)
    return [x if x.dtype == dt else x.astype(dt) for x in arrays]


def _to_float(x: mx.array) -> mx.array:
    """Integers and bools become float32 (torch's default dtype)."""
    return x if _is_float(x.dtype) or _is_complex(x.dtype) else x.astype(mx.float32)


def _opmath(fn, x: mx.array) -> mx.array:
    """Compute ``fn`` in float32 for half inputs and round once, like torch CPU."""
    if x.dtype in _HALF:
        return fn(x.astype(mx.float32)).astype(x.dtype)
    return fn(x)


# --------------------------------------------------------------------------- unary


def _unary(fn):
    def handler(frame, node):
        frame.set_t(node.out, fn(frame.t(node.x)))

    return handler


def _int_identity(fn):
    """Rounding ops are the identity on integers and bools (torch keeps the dtype)."""

    def wrapped(x):
        if _is_float(x.dtype) or _is_complex(x.dtype):
            return fn(x)
        return x

    return wrapped


def _sign(x):
    if x.dtype == mx.bool_:
        return x
    return mx.sign(x)


def _bitwise_invert(x):
    if x.dtype == mx.bool_:
        return mx.logical_not(x)
    return mx.bitwise_invert(x)


def _silu(x):
    return _opmath(lambda v: v * mx.sigmoid(v), _to_float(x))


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)


def _gelu_tanh(v):
    inner = _SQRT_2_OVER_PI * (v + 0.044715 * (v * v * v))
    return 0.5 * v * (1.0 + mx.tanh(inner))


def _gelu_none(v):
    return 0.5 * v * (1.0 + mx.erf(v * _INV_SQRT_2))


_UNARY = {
    "FloorNode": _int_identity(mx.floor),
    "CeilNode": _int_identity(mx.ceil),
    "TruncNode": _int_identity(mx.trunc),
    "SquareNode": mx.square,
    "ExpNode": mx.exp,
    "SinNode": mx.sin,
    "CosNode": mx.cos,
    "TanNode": mx.tan,
    "ArcsinNode": mx.arcsin,
    "ArccosNode": mx.arccos,
    "ArctanNode": mx.arctan,
    "SinhNode": mx.sinh,
    "CoshNode": mx.cosh,
    "ArcsinhNode": mx.arcsinh,
    "ArccoshNode": mx.arccosh,
    "ArctanhNode": mx.arctanh,
    "LogNode": mx.log,
    "Log2Node": mx.log2,
    "Log10Node": mx.log10,
    "Log1pNode": mx.log1p,
    "ErfNode": mx.erf,
    "Expm1Node": mx.expm1,
    "ReciprocalNode": lambda x: mx.reciprocal(_to_float(x)),
    "SqrtNode": mx.sqrt,
    "RsqrtNode": mx.rsqrt,
    "AbsNode": mx.abs,
    "NegNode": mx.negative,
    "SignNode": _sign,
    "SiluNode": _silu,
    "SigmoidNode": mx.sigmoid,
    "TanhNode": mx.tanh,
    "LogicalNotNode": mx.logical_not,
    "BitwiseInvertNode": _bitwise_invert,
}

for _name, _fn in _UNARY.items():
    handles(_name)(_unary(_fn))


@handles("RoundNode")
def round_(frame, node):
    x = frame.t(node.x)
    decimals = int(node.decimals or 0)
    if not (_is_float(x.dtype) or _is_complex(x.dtype)):
        out = x  # torch.round on integers is the identity (decimals=0 only in core ATen)
    else:
        out = mx.round(x, decimals)  # both round half to even
    frame.set_t(node.out, out)


@handles("GeluNode")
def gelu(frame, node):
    approximate = node.approximate
    if isinstance(approximate, bytes):
        approximate = approximate.decode()
    fn = _gelu_tanh if approximate == "tanh" else _gelu_none
    frame.set_t(node.out, _opmath(fn, _to_float(frame.t(node.x))))


# --------------------------------------------------------------------------- binary


def _binary(fn):
    def handler(frame, node):
        a, b = _promote(frame.t(node.a), frame.t(node.b))
        frame.set_t(node.out, fn(a, b))

    return handler


def _divide(a, b):
    return mx.divide(_to_float(a), _to_float(b))


def _floor_divide(a, b):
    if not (_is_float(a.dtype) or _is_complex(a.dtype)):
        return mx.floor_divide(a, b)  # integer: MLX floors like torch
    # torch's div_floor: mod = fmod(a, b); div = (a - mod) / b, minus one when mod
    # and b differ in sign; i.e. (a - remainder(a, b)) / b with Python's remainder.
    # The quotient is then rounded to the nearest integer (floor, +1 past .5); a
    # zero result keeps the sign of a / b; b == 0 gives a / b (±inf or nan).
    true_div = a / b
    div = (a - mx.remainder(a, b)) / b
    fl = mx.floor(div)
    fl = mx.where(div - fl > 0.5, fl + 1, fl)
    fl = mx.where(div == 0, true_div * 0, fl)  # copysign(0, a / b)
    return mx.where(b == 0, true_div, fl)


def _float_binary(fn):
    return lambda a, b: fn(_to_float(a), _to_float(b))


_BINARY = {
    "AddNode": mx.add,
    "SubtractNode": mx.subtract,
    "MultiplyNode": mx.multiply,
    "DivideNode": _divide,
    "MaximumNode": mx.maximum,
    "MinimumNode": mx.minimum,
    "Atan2Node": _float_binary(mx.arctan2),
    "LogAddExpNode": _float_binary(mx.logaddexp),
    "FloorDivideNode": _floor_divide,
    "PowerNode": mx.power,
    "RemainderNode": mx.remainder,
    "BitwiseAndNode": mx.bitwise_and,
    "BitwiseOrNode": mx.bitwise_or,
    "BitwiseXorNode": mx.bitwise_xor,
    "LogicalAndNode": mx.logical_and,
    "LogicalOrNode": mx.logical_or,
    # comparisons: compared in the promoted dtype, output bool
    "LessNode": mx.less,
    "LessEqualNode": mx.less_equal,
    "GreaterNode": mx.greater,
    "GreaterEqualNode": mx.greater_equal,
    "EqualNode": mx.equal,
    "NotEqualNode": mx.not_equal,
}

for _name, _fn in _BINARY.items():
    handles(_name)(_binary(_fn))


@handles("WhereNode")
def where(frame, node):
    cond = frame.t(node.condition)
    if cond.dtype != mx.bool_:
        cond = cond.astype(mx.bool_)
    x, y = _promote(frame.t(node.x), frame.t(node.y))
    frame.set_t(node.out, mx.where(cond, x, y))


@handles("ClipNode")
def clip(frame, node):
    x = frame.t(node.x)
    lo = frame.t(node.a_min) if node.a_min is not None else None
    hi = frame.t(node.a_max) if node.a_max is not None else None
    bounds = [b for b in (lo, hi) if b is not None]
    if not bounds:
        frame.set_t(node.out, x)
        return
    x, *bounds = _promote(x, *bounds)
    if lo is not None:
        lo = bounds.pop(0)
    if hi is not None:
        hi = bounds.pop(0)
    # torch.clamp: min(max(x, lo), hi); NaN in x or a bound propagates
    out = x
    if lo is not None:
        out = mx.maximum(out, lo)
    if hi is not None:
        out = mx.minimum(out, hi)
    frame.set_t(node.out, out)


# --------------------------------------------------------------------------- dtype / creation


@handles("AsTypeNode")
def astype(frame, node):
    x = frame.t(node.x)
    dt = frame.dtype(node.scalar_type)
    frame.set_t(node.out, x if x.dtype == dt else x.astype(dt))


def _fill(value, dtype):
    """The fill value of Full/FullLike (carried as a double) in ``dtype``."""
    if dtype == mx.bool_:
        return bool(value)
    if not (_is_float(dtype) or _is_complex(dtype)):
        if isinstance(value, float) and value.is_integer():
            return int(value)
    return value


def meta_dtype(frame, tid):
    """The dtype the program records for a non-temporary tensor slot (constants,
    inputs, outputs, mutable buffers: ``tensor_meta`` is indexed by tid), or None."""
    metas = getattr(frame.graph, "tensor_meta", None)
    idx = tid.idx
    if metas and isinstance(idx, int) and idx < len(metas) and metas[idx] is not None:
        return frame.dtype(metas[idx].scalar_type)
    return None


@handles("FullNode")
def full(frame, node):
    shape = [frame.int_(d) for d in (node.shape or [])]
    # The lowering writes float32 whenever full() has no dtype= argument, but torch
    # infers it from the fill value (torch.full((2,), n) is int64). When the output
    # slot's recorded dtype says otherwise, that one is the torch dtype.
    dt = meta_dtype(frame, node.out)
    if dt is None:
        dt = frame.dtype(node.scalar_type)
    frame.set_t(node.out, mx.full(shape, _fill(frame.float_(node.v), dt), dtype=dt))


@handles("FullLikeNode")
def full_like(frame, node):
    x = frame.t(node.x)
    dt = frame.dtype(node.scalar_type) if node.scalar_type is not None else x.dtype
    frame.set_t(node.out, mx.full(x.shape, _fill(frame.float_(node.v), dt), dtype=dt))


@handles("ARangeNode")
def arange(frame, node):
    start, stop, step = frame.int_(node.start), frame.int_(node.stop), frame.int_(node.step)
    if step == 0:
        raise ValueError("ARangeNode: step must not be zero")
    if node.scalar_type is not None:
        out = mx.arange(start, stop, step, dtype=frame.dtype(node.scalar_type))
    else:
        out = mx.arange(start, stop, step)
    frame.set_t(node.out, out)


# --------------------------------------------------------------------------- scalar ints (value slots)


_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _int_binary(fn, name):
    def handler(frame, node):
        out = int(fn(int(frame.int_(node.a)), int(frame.int_(node.b))))
        if not _INT32_MIN <= out <= _INT32_MAX:
            # value slots are int32 in ExecuTorch's runtime, which raises here too
            raise OverflowError(f"{name}: int32 overflow ({out})")
        frame.set_v(node.out, out)

    return handler


def _floordiv(a, b):
    if b == 0:
        raise ZeroDivisionError("FloorDivideIntNode: division by zero")
    return a // b  # Python floors, as SymInt floordiv does


def _mod(a, b):
    if b == 0:
        raise ZeroDivisionError("ModIntNode: modulo by zero")
    return a % b  # Python: the result takes the divisor's sign


for _name, _fn in {"AddIntNode": lambda a, b: a + b, "SubtractIntNode": lambda a, b: a - b,
                   "MultiplyIntNode": lambda a, b: a * b, "FloorDivideIntNode": _floordiv,
                   "ModIntNode": _mod}.items():
    handles(_name)(_int_binary(_fn, _name))


@handles("SymSizeNode")
def sym_size(frame, node):
    x = frame.t(node.a)
    dim = int(node.dim)
    if not -x.ndim <= dim < x.ndim:
        raise IndexError(f"SymSizeNode: dim {dim} out of range for rank {x.ndim}")
    frame.set_v(node.out, int(x.shape[dim]))


@handles("ItemIntNode")
def item_int(frame, node):
    # The one intentional sync: a SymInt needs a concrete value (as in the C++ runtime).
    frame.set_v(node.out, int(frame.t(node.x).item()))
