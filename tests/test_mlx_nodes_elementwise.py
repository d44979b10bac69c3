"""Elementwise and reduction nodes of the Python MLX runtime against torch eager.

Each group is one small module using several ATen ops; it is exported (dynamic batch
where the ops allow), lowered with ExecuTorch's MLXPartitioner, serialized to a .pte
and run through ``mlx_runtime``. Every check names the payload node it
covers: the test asserts the node really is in the payload (so an op decomposed into
something else cannot pass by accident), then compares that output, dtype included,
with the module's eager output. Lowered programs and runs are cached per group and
dtype, so the many parametrized cases cost a handful of lowerings.

Node types no ATen op lowers to (Median, Cumsum's reverse/exclusive flags, Round's
decimals, ...) and dtype rules that need a 0-d operand are checked on the handlers
directly with a stand-in frame at the end of the file.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")
pytest.importorskip("executorch")

F = torch.nn.functional

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "i32": torch.int32, "i64": torch.int64, "bool": torch.bool}
# (rtol, atol) per output dtype
TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 1e-3), torch.bfloat16: (1.6e-2, 1e-2)}

BATCH = torch.export.Dim("batch", min=2, max=64)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _uniform(g, lo, hi, *shape, dtype=torch.float32):
    return (torch.rand(*shape, generator=g) * (hi - lo) + lo).to(dtype)


def _halves(g, *shape, dtype=torch.float32, lo=-8, hi=8):
    """Multiples of 0.5: exact in every float dtype, so ties, equal operands and
    exact quotients really happen."""
    return (torch.randint(lo, hi, shape, generator=g) / 2).to(dtype)


def _nonzero_halves(g, *shape, dtype=torch.float32):
    v = torch.randint(1, 7, shape, generator=g) / 2
    sign = torch.where(torch.rand(*shape, generator=g) < 0.5, -1.0, 1.0)
    return (v * sign).to(dtype)


# --------------------------------------------------------------------------- groups
#
# A group: a module whose forward returns a tuple, CHECKS naming each output
# (label, node type that must be in the payload), the dtypes it runs in, example
# inputs (batch, dtype) -> tuple and dynamic shapes.


class UnaryFloat(torch.nn.Module):
    CHECKS = [("floor", "FloorNode"), ("ceil", "CeilNode"), ("trunc", "TruncNode"),
              ("square", "SquareNode"), ("exp", "ExpNode"), ("sin", "SinNode"), ("cos", "CosNode"),
              ("tan", "TanNode"), ("asin", "ArcsinNode"), ("acos", "ArccosNode"), ("atan", "ArctanNode"),
              ("sinh", "SinhNode"), ("cosh", "CoshNode"), ("asinh", "ArcsinhNode"), ("acosh", "ArccoshNode"),
              ("atanh", "ArctanhNode"), ("log", "LogNode"), ("log2", "Log2Node"), ("log10", "Log10Node"),
              ("log1p", "Log1pNode"), ("erf", "ErfNode"), ("expm1", "Expm1Node"), ("round", "RoundNode"),
              ("reciprocal", "ReciprocalNode"), ("sqrt", "SqrtNode"), ("rsqrt", "RsqrtNode"), ("abs", "AbsNode"),
              ("neg", "NegNode"), ("sign", "SignNode"), ("gelu", "GeluNode"), ("gelu_tanh", "GeluNode"),
              ("silu", "SiluNode"), ("sigmoid", "SigmoidNode"), ("tanh", "TanhNode"),
              ("logical_not", "LogicalNotNode"), ("exp_transposed", "ExpNode")]
    DTYPES = ["fp32", "fp16", "bf16"]

    def forward(self, u, p, y):
        # u in (-0.9, 0.9) for the inverse trig functions, p > 1 for logs / acosh,
        # y: multiples of 0.5 and wider (rounding ties, gelu tails)
        return (torch.floor(y), torch.ceil(y), torch.trunc(y), torch.square(y), torch.exp(y), torch.sin(y),
                torch.cos(y), torch.tan(u), torch.asin(u), torch.acos(u), torch.atan(y), torch.sinh(y),
                torch.cosh(y), torch.asinh(y), torch.acosh(p), torch.atanh(u), torch.log(p), torch.log2(p),
                torch.log10(p), torch.log1p(u), torch.erf(y), torch.expm1(u), torch.round(y),
                torch.reciprocal(p), torch.sqrt(p), torch.rsqrt(p), torch.abs(y), torch.neg(y), torch.sign(y),
                F.gelu(y), F.gelu(y, approximate="tanh"), F.silu(y), torch.sigmoid(y), torch.tanh(y),
                torch.logical_not(y), torch.exp(u.transpose(0, 1)))

    @staticmethod
    def inputs(batch, dtype, g):
        y = torch.cat([_halves(g, batch, 3), _randn(g, batch, 3, scale=3.0)], 1)
        return (_uniform(g, -0.9, 0.9, batch, 6, dtype=dtype), _uniform(g, 1.1, 6.0, batch, 6, dtype=dtype),
                y.to(dtype))

    DYNAMIC = ({0: BATCH}, {0: BATCH}, {0: BATCH})


class UnaryInt(torch.nn.Module):
    CHECKS = [("abs", "AbsNode"), ("neg", "NegNode"), ("sign", "SignNode"), ("square", "SquareNode"),
              ("floor", "FloorNode"), ("ceil", "CeilNode"), ("round", "RoundNode"), ("trunc", "TruncNode"),
              ("bitwise_not", "BitwiseInvertNode"), ("reciprocal", "ReciprocalNode"), ("sqrt", "SqrtNode"),
              ("logical_not", "LogicalNotNode"), ("bool_bitwise_not", "LogicalNotNode")]
    DTYPES = ["i32", "i64"]

    def forward(self, i, b):
        return (torch.abs(i), torch.neg(i), torch.sign(i), torch.square(i), torch.floor(i), torch.ceil(i),
                torch.round(i), torch.trunc(i), torch.bitwise_not(i), torch.reciprocal(i),
                torch.sqrt(torch.abs(i)), torch.logical_not(i), torch.bitwise_not(b))

    @staticmethod
    def inputs(batch, dtype, g):
        return torch.randint(-50, 50, (batch, 5), generator=g, dtype=dtype), torch.rand(batch, 5, generator=g) > 0.5

    DYNAMIC = ({0: BATCH}, {0: BATCH})


class BinaryFloat(torch.nn.Module):
    CHECKS = [("add_bcast", "AddNode"), ("add_alpha", "AddNode"), ("add_scalar", "AddNode"),
              ("sub_col", "SubtractNode"), ("mul", "MultiplyNode"), ("mul_scalar", "MultiplyNode"),
              ("div", "DivideNode"), ("maximum", "MaximumNode"), ("minimum", "MinimumNode"),
              ("atan2", "Atan2Node"), ("logaddexp", "LogAddExpNode"), ("floor_divide", "FloorDivideNode"),
              ("div_floor", "FloorDivideNode"), ("pow", "PowerNode"), ("pow_scalar", "PowerNode"),
              ("remainder", "RemainderNode"), ("remainder_scalar", "RemainderNode"), ("lt", "LessNode"),
              ("le", "LessEqualNode"), ("gt", "GreaterNode"), ("ge", "GreaterEqualNode"), ("eq", "EqualNode"),
              ("ne", "NotEqualNode"), ("eq_scalar", "EqualNode"), ("add_transposed", "AddNode")]
    DTYPES = ["fp32", "fp16", "bf16"]

    def forward(self, a, b, c, d, pos):
        # a [n, 6]; b [6] (broadcast); c [n, 1]; d [6] nonzero; pos > 0 [n, 6]
        return (a + b, torch.add(a, b, alpha=2), a + 2.5, a - c, a * b, a * 3, a / d, torch.maximum(a, b),
                torch.minimum(a, c), torch.atan2(a, b), torch.logaddexp(a, b), torch.floor_divide(a, d),
                torch.div(a, d, rounding_mode="floor"), torch.pow(pos, b), a ** 3, torch.remainder(a, d),
                a % 1.5, a < b, a <= b, a > c, a >= c, a == b, a != b, a == 0.5,
                a.transpose(0, 1)[:2].transpose(0, 1) + b[:2])

    @staticmethod
    def inputs(batch, dtype, g):
        return (_halves(g, batch, 6, dtype=dtype), _halves(g, 6, dtype=dtype), _halves(g, batch, 1, dtype=dtype),
                _nonzero_halves(g, 6, dtype=dtype), _uniform(g, 0.5, 2.0, batch, 6, dtype=dtype))

    DYNAMIC = ({0: BATCH}, None, {0: BATCH}, None, {0: BATCH})


class BinaryInt(torch.nn.Module):
    CHECKS = [("add", "AddNode"), ("sub", "SubtractNode"), ("mul", "MultiplyNode"),
              ("floor_divide", "FloorDivideNode"), ("floor_divide_scalar", "FloorDivideNode"),
              ("remainder", "RemainderNode"), ("remainder_scalar", "RemainderNode"), ("true_div", "DivideNode"),
              ("maximum", "MaximumNode"), ("minimum", "MinimumNode"), ("bitwise_and", "BitwiseAndNode"),
              ("bitwise_or", "BitwiseOrNode"), ("bitwise_xor", "BitwiseXorNode"), ("pow", "PowerNode"),
              ("lt", "LessNode"), ("le", "LessEqualNode"), ("gt", "GreaterNode"), ("ge", "GreaterEqualNode"),
              ("eq", "EqualNode"), ("ne", "NotEqualNode")]
    DTYPES = ["i32", "i64"]

    def forward(self, a, b, e):
        # a [n, 6] signed; b [6] nonzero, both signs; e [6] small non-negative exponents
        return (a + b, a - b, a * b, torch.floor_divide(a, b), a // -3, torch.remainder(a, b), a % -3, a / b,
                torch.maximum(a, b), torch.minimum(a, b), a & b, a | b, a ^ b, torch.pow(a, e), a < b, a <= b,
                a > b, a >= b, a == b, a != b)

    @staticmethod
    def inputs(batch, dtype, g):
        b = torch.tensor([3, -3, 7, -2, 1, 5], dtype=dtype)
        return (torch.randint(-20, 20, (batch, 6), generator=g, dtype=dtype), b,
                torch.tensor([0, 1, 2, 3, 2, 1], dtype=dtype))

    DYNAMIC = ({0: BATCH}, None, None)


class Logical(torch.nn.Module):
    CHECKS = [("logical_and", "LogicalAndNode"), ("logical_or", "LogicalOrNode"),
              ("logical_and_float", "LogicalAndNode"), ("logical_or_float", "LogicalOrNode"),
              ("bool_and", "BitwiseAndNode"), ("bool_or", "BitwiseOrNode"), ("bool_xor", "BitwiseXorNode"),
              ("bool_eq", "EqualNode")]
    DTYPES = ["bool"]

    def forward(self, p, q, x, y):
        return (torch.logical_and(p, q), torch.logical_or(p, q), torch.logical_and(x, y), torch.logical_or(x, y),
                p & q, p | q, p ^ q, p == q)

    @staticmethod
    def inputs(batch, dtype, g):
        def zeros_and_ones(*shape):
            return _halves(g, *shape, lo=-1, hi=2).round()

        return (torch.rand(batch, 5, generator=g) > 0.5, torch.rand(5, generator=g) > 0.5,
                zeros_and_ones(batch, 5), zeros_and_ones(batch, 5))

    DYNAMIC = ({0: BATCH}, None, {0: BATCH}, {0: BATCH})


class MixedDtypes(torch.nn.Module):
    """Type promotion: the ExecuTorch edge passes insert AsType where torch promotes;
    the nodes still see these operands."""

    CHECKS = [("int_plus_float", "AddNode"), ("int_true_div", "DivideNode"), ("int_times_half", "MultiplyNode"),
              ("half_times_float", "MultiplyNode"), ("int_lt_float", "LessNode"), ("where_mixed", "WhereNode"),
              ("bool_plus_int", "AddNode")]
    DTYPES = ["fp32"]

    def forward(self, i, x, h, b):
        return (i + x, i / (i.abs() + 1), i * 0.5, h * x, i < x, torch.where(b, h, x), b + i)

    @staticmethod
    def inputs(batch, dtype, g):
        return (torch.randint(-9, 9, (batch, 4), generator=g, dtype=torch.int32), _halves(g, batch, 4),
                _randn(g, batch, 4, dtype=torch.float16), torch.rand(batch, 4, generator=g) > 0.5)

    DYNAMIC = ({0: BATCH}, {0: BATCH}, {0: BATCH}, {0: BATCH})


class WhereClip(torch.nn.Module):
    CHECKS = [("where", "WhereNode"), ("where_bcast", "WhereNode"), ("clamp", "ClipNode"),
              ("clamp_min", "ClipNode"), ("clamp_max", "ClipNode"), ("clamp_tensor", "ClipNode"),
              ("hardtanh", "ClipNode")]
    DTYPES = ["fp32", "fp16", "bf16", "i32"]

    def forward(self, a, b, lo, hi):
        return (torch.where(a > 0, a, b), torch.where(b > 0, a, b), torch.clamp(a, -2, 3), torch.clamp(a, min=0),
                torch.clamp(a, max=1), torch.clamp(a, lo, hi), F.hardtanh(a, -3, 2))

    @staticmethod
    def inputs(batch, dtype, g):
        return (_halves(g, batch, 6, dtype=dtype), _halves(g, 6, dtype=dtype),
                _halves(g, batch, 1, dtype=dtype, lo=-6, hi=0), _halves(g, 6, dtype=dtype, lo=0, hi=6))

    DYNAMIC = ({0: BATCH}, None, {0: BATCH}, None)


class AsType(torch.nn.Module):
    CHECKS = [("to_fp16", "AsTypeNode"), ("to_bf16", "AsTypeNode"), ("to_i32", "AsTypeNode"),
              ("to_i64", "AsTypeNode"), ("to_bool", "AsTypeNode"), ("int_to_float", "AsTypeNode"),
              ("bool_to_float", "AsTypeNode"), ("half_to_float", "AsTypeNode")]
    DTYPES = ["fp32"]

    def forward(self, x, i, b, h):
        return (x.to(torch.float16), x.to(torch.bfloat16), x.to(torch.int32), x.to(torch.int64), x.to(torch.bool),
                i.to(torch.float32), b.to(torch.float32), h.float())

    @staticmethod
    def inputs(batch, dtype, g):
        x = torch.cat([_randn(g, batch, 3, scale=5.0), _halves(g, batch, 3)], 1)
        return (x, torch.randint(-1000, 1000, (batch, 6), generator=g, dtype=torch.int32),
                torch.rand(batch, 6, generator=g) > 0.5, _randn(g, batch, 6, dtype=torch.float16))

    DYNAMIC = ({0: BATCH}, {0: BATCH}, {0: BATCH}, {0: BATCH})


class Creation(torch.nn.Module):
    """Full / FullLike / ARange, with sizes computed on symbolic ints (SymSize and the
    scalar int nodes on value slots)."""

    CHECKS = [("full_dynamic", "FullNode"), ("full_dynamic", "SymSizeNode"), ("zeros_int64", "FullNode"),
              ("full_symint_value", "FullNode"), ("ones_like", "FullLikeNode"),
              ("full_like_int32", "FullLikeNode"), ("zeros_like_bool", "FullLikeNode"),
              ("arange_n", "ARangeNode"), ("arange_start_step", "ARangeNode"), ("arange_start_step", "AddIntNode"),
              ("arange_sub", "SubtractIntNode"), ("arange_mul", "MultiplyIntNode"),
              ("arange_floordiv", "FloorDivideIntNode"), ("arange_mod", "ModIntNode"),
              ("arange_float", "ARangeNode"), ("arange_empty", "ARangeNode")]
    DTYPES = ["fp32"]

    def forward(self, x):
        n = x.shape[0]
        return (torch.full((n, 3), 2.5), torch.zeros(2, 3, dtype=torch.int64), torch.full((2,), n),
                torch.ones_like(x), torch.full_like(x, 7, dtype=torch.int32), torch.zeros_like(x, dtype=torch.bool),
                torch.arange(n), torch.arange(2, n + 5, 3), torch.arange(n - 1), torch.arange(n * 2),
                torch.arange(n // 2), torch.arange(n % 3 + 2), torch.arange(0, 7, 2, dtype=torch.float32),
                torch.arange(3, 3))

    @staticmethod
    def inputs(batch, dtype, g):
        return (_randn(g, batch, 4),)

    # sizes of 0 or 1 specialize in export: keep every arange length >= 2
    DYNAMIC = ({0: torch.export.Dim("rows", min=4, max=64)},)


class ItemInt(torch.nn.Module):
    CHECKS = [("arange_item", "ItemIntNode"), ("full_item", "ItemIntNode")]
    DTYPES = ["i64"]

    def forward(self, k):
        m = k[0].item()
        torch._check(m >= 1)
        torch._check(m <= 16)
        return torch.arange(m), torch.full((m, 2), 1.5)

    @staticmethod
    def inputs(batch, dtype, g):
        return (torch.tensor([batch], dtype=torch.int64),)

    DYNAMIC = None


class ReduceFloat(torch.nn.Module):
    CHECKS = [("sum_last", "SumNode"), ("sum_keepdim", "SumNode"), ("sum_all", "SumNode"),
              ("mean", "MeanNode"), ("mean_keepdim", "MeanNode"), ("mean_all", "MeanNode"),
              ("var", "VarNode"), ("var_biased_keepdim", "VarNode"), ("var_all", "VarNode"),
              ("std_correction2", "StdNode"), ("std_all", "StdNode"), ("prod", "ProdNode"),
              ("prod_all", "ProdNode"), ("amax", "MaxNode"), ("amax_multi", "MaxNode"), ("amin_keepdim", "MinNode"),
              ("max_all", "MaxNode"), ("min_all", "MinNode"), ("argmax", "ArgmaxNode"),
              ("argmax_keepdim", "ArgmaxNode"), ("argmax_all", "ArgmaxNode"), ("argmin", "ArgminNode"),
              ("argmin_all", "ArgminNode"), ("logsumexp", "LogSumExpNode"), ("logsumexp_keepdim", "LogSumExpNode"),
              ("log_softmax", "LogSumExpNode"), ("softmax", "SoftmaxNode"), ("softmax_dim0", "SoftmaxNode"),
              ("any", "AnyNode"), ("all", "AllNode"), ("any_all", "AnyNode"), ("cumsum", "CumsumNode"),
              ("cumsum_neg", "CumsumNode"), ("sum_transposed", "SumNode")]
    DTYPES = ["fp32", "fp16", "bf16"]

    def forward(self, x):
        # x [n, 4, 6]. argmax()/argmin() without dim reduce a static slice: on a dynamic
        # input the MLX lowering reads numel() as a constant, which pins the batch
        # dimension of the whole method to the example size.
        return (x.sum(-1), x.sum((0, 2), keepdim=True), x.sum(), x.mean(1), x.mean((-1, -2), keepdim=True),
                x.mean(), x.var(-1), x.var(1, correction=0, keepdim=True), x.var(), x.std(-1, correction=2),
                x.std(), x.prod(-1), x.prod(), x.amax(-1), x.amax((0, 1)), x.amin(-2, keepdim=True), x.max(),
                x.min(), x.argmax(-1), x.argmax(1, keepdim=True), x[0].argmax(), x.argmin(0), x[1].argmin(),
                x.logsumexp(-1), x.logsumexp((1, 2), keepdim=True), F.log_softmax(x, -1), F.softmax(x, -1),
                F.softmax(x, 0), (x > 0.5).any(-1), (x > -2).all(1), (x > 2.5).any(), x.cumsum(1), x.cumsum(-1),
                x.transpose(1, 2).sum(-1))

    @staticmethod
    def inputs(batch, dtype, g):
        return (_randn(g, batch, 4, 6, dtype=dtype),)

    DYNAMIC = ({0: BATCH},)


class ReduceInt(torch.nn.Module):
    CHECKS = [("sum", "SumNode"), ("sum_all", "SumNode"), ("prod", "ProdNode"), ("amax", "MaxNode"),
              ("amin", "MinNode"), ("argmax", "ArgmaxNode"), ("argmin", "ArgminNode"), ("cumsum", "CumsumNode"),
              ("cumsum_dtype", "CumsumNode"), ("any", "AnyNode"), ("all", "AllNode"), ("bool_sum", "SumNode"),
              ("bool_cumsum", "CumsumNode")]
    DTYPES = ["i32", "i64"]

    def forward(self, i, b):
        return (i.sum(-1), i.sum(), i.prod(-1), i.amax(0), i.amin(-1), i.argmax(-1), i.argmin(0), i.cumsum(0),
                torch.cumsum(i, 1, dtype=torch.float32), i.any(-1), i.all(0), b.sum(-1), b.cumsum(-1))

    @staticmethod
    def inputs(batch, dtype, g):
        i = torch.randint(-4, 5, (batch, 5), generator=g, dtype=dtype)
        return i, torch.rand(batch, 5, generator=g) > 0.5

    DYNAMIC = ({0: BATCH}, {0: BATCH})


class EmptyDims(torch.nn.Module):
    """Zero-size dimensions (static shapes)."""

    CHECKS = [("sum_empty", "SumNode"), ("prod_empty", "ProdNode"), ("any_empty", "AnyNode"),
              ("all_empty", "AllNode"), ("cumsum_empty", "CumsumNode"), ("sin_empty", "SinNode"),
              ("add_empty", "AddNode"), ("sum_over_nonempty", "SumNode"), ("mean_empty", "MeanNode"),
              ("logsumexp_empty", "LogSumExpNode"), ("amax_nonempty_axis", "MaxNode"),
              ("int_sum_empty", "SumNode")]
    DTYPES = ["fp32"]

    def forward(self, x):
        # x [3, 0]
        return (x.sum(-1), x.prod(-1), (x > 0).any(-1), (x > 0).all(-1), x.cumsum(-1), torch.sin(x), x + x, x.sum(0),
                x.mean(-1), x.logsumexp(-1), x.amax(0), x.to(torch.int32).sum(-1))

    @staticmethod
    def inputs(batch, dtype, g):
        return (torch.zeros(3, 0),)

    DYNAMIC = None


class ZeroDim(torch.nn.Module):
    """0-d tensors: a 0-d input, 0-d lifted constants, 0-d results, and torch's rule
    that a 0-d operand does not promote a dimensioned one (fp16[n] * fp32[] is fp16)."""

    CHECKS = [("sum_all_scaled", "MultiplyNode"), ("zero_dim_input_plus_one", "AddNode"),
              ("half_times_zero_dim_float", "MultiplyNode"), ("zero_dim_where", "WhereNode"),
              ("item_of_zero_dim", "ItemIntNode")]
    DTYPES = ["fp32"]

    def forward(self, x, k, h, n):
        m = n.item()
        torch._check(m >= 2)
        torch._check(m <= 16)
        return (x.sum() * 2.0, k + 1, h * k, torch.where(k > 0, h, k), torch.arange(m))

    @staticmethod
    def inputs(batch, dtype, g):
        return (_randn(g, batch, 3), torch.tensor(1.0 / 3.0), _randn(g, batch, 3, dtype=torch.float16),
                torch.tensor(batch, dtype=torch.int64))

    DYNAMIC = ({0: BATCH}, None, {0: BATCH}, None)


GROUPS = {cls.__name__: cls for cls in (UnaryFloat, UnaryInt, BinaryFloat, BinaryInt, Logical, MixedDtypes,
                                        WhereClip, AsType, Creation, ItemInt, ReduceFloat, ReduceInt, EmptyDims,
                                        ZeroDim)}
EXPORT_BATCH, RUN_BATCH = 4, 5  # run on a batch the export did not see


def _labels(group: str) -> list[str]:
    """Output labels in output order (a label may be listed with several nodes)."""
    return list(dict.fromkeys(label for label, _ in GROUPS[group].CHECKS))


def _cases():
    for name, cls in GROUPS.items():
        for dt in cls.DTYPES:
            seen = set()
            for label, node in cls.CHECKS:
                key = f"{label}:{node}"
                if key not in seen:
                    seen.add(key)
                    yield pytest.param(name, dt, label, node, id=f"{name}-{dt}-{label}-{node}",
                                       marks=_xfail(cls, label))


def _xfail(cls, label=None):
    """Known failures outside this file's nodes (strict: a fix makes them XPASS, so
    the marker gets removed)."""
    reason = getattr(cls, "XFAIL", None)
    if reason and (label is None or label in cls.XFAIL_LABELS):
        return [pytest.mark.xfail(strict=True, reason=reason)]
    return []


# --------------------------------------------------------------------------- lowering and running


@functools.lru_cache(maxsize=None)
def _workdir() -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="mlx-nodes-elementwise-"))


@functools.lru_cache(maxsize=None)
def _lowered(group: str, dt: str):
    """(pte path, node type counts) for one group in one dtype."""
    from backends.mlx import lower

    cls = GROUPS[group]
    module = cls().eval()
    example = cls.inputs(EXPORT_BATCH, DTYPES[dt], _gen(0))
    ep = torch.export.export(module, example, dynamic_shapes=cls.DYNAMIC, strict=False)
    _, program = lower({"forward": ep}, {}, {})
    path = _workdir() / f"{group}-{dt}.pte"
    path.write_bytes(program.buffer)
    return path, _payload_nodes(program.buffer)


def _payload_nodes(pte: bytes) -> dict[str, int]:
    """Node type -> count over every MLX delegate payload in the program, read with
    the runtime's own payload reader."""
    from executorch.backends.mlx.pte_inspector import extract_delegate_payload

    from mlx_runtime import fb

    names, counts, k = fb.node_type_names(), {}, 0
    while True:
        try:
            payload = extract_delegate_payload(pte, "mlx", delegate_index=k)
        except Exception:  # noqa: BLE001 - no delegate with that index
            payload = None
        if payload is None:
            break
        graph, _ = fb.read_payload(payload)
        for chain in graph.instructionChains or []:
            for ins in chain.instructions or []:
                name = names[int(ins.opType)]
                counts[name] = counts.get(name, 0) + 1
        k += 1
    assert k, "the program has no MLX delegate"
    return counts


def _to_torch(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, mx.array):
        if x.dtype == mx.bfloat16:
            return torch.from_numpy(np.array(x.view(mx.uint16))).view(torch.bfloat16)
        return torch.from_numpy(np.array(x))
    return torch.as_tensor(x)


@functools.lru_cache(maxsize=None)
def _program(group: str, dt: str, precision: str):
    from mlx_runtime import load

    path, _ = _lowered(group, dt)
    program = load(str(path), precision=precision)
    # The executor casts delegate outputs to the dtypes the program planned, which
    # would hide a handler computing in the wrong dtype. Let the raw dtypes through:
    # a wrong one then shows up as a dtype mismatch against eager.
    for runner in getattr(program.method("forward"), "delegates", []):
        runner.execute = functools.partial(_raw_execute, runner.execute)
    return program


def _raw_execute(execute, inputs, out_dtypes=None):
    return execute(inputs, None)


def _noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a transposed (non-contiguous) layout."""
    if t.ndim < 2:
        return t
    out = t.transpose(0, -1).contiguous().transpose(0, -1)
    assert torch.equal(out, t) and (out.is_contiguous() == (t.shape[0] == 1 or t.shape[-1] == 1))
    return out


@functools.lru_cache(maxsize=None)
def _run(group: str, dt: str, layout: str = "contiguous", precision: str = "native"):
    """(runtime outputs, eager outputs) for one group, dtype, input layout and runtime
    precision ("native": the graph's own dtypes, so fp16/bf16 nodes really run in
    half precision; "auto": the runtime's default, float32 arithmetic on CPU)."""
    cls = GROUPS[group]
    batch = RUN_BATCH if cls.DYNAMIC else EXPORT_BATCH
    inputs = cls.inputs(batch, DTYPES[dt], _gen(1))
    if layout == "noncontiguous":
        inputs = tuple(_noncontiguous(t) for t in inputs)
    with torch.no_grad():
        want = cls()(*inputs)
    got = _program(group, dt, precision).forward(*inputs)
    got = [_to_torch(x) for x in (got if isinstance(got, (list, tuple)) else [got])]
    assert len(got) == len(want), f"{len(got)} outputs, eager has {len(want)}"
    return got, list(want)


def _assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, torch gives {want.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)}, torch gives {tuple(want.shape)}"
    if want.dtype.is_floating_point:
        rtol, atol = TOL[want.dtype]
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(got, want), f"{what}:\n got {got}\nwant {want}"


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module", autouse=True)
def _schema():
    from backends.mlx_schema import ensure_mlx_schema

    ensure_mlx_schema()


@pytest.mark.parametrize("group, dt, label, node", list(_cases()))
def test_node_matches_torch(group, dt, label, node):
    _, counts = _lowered(group, dt)
    assert node in counts, f"{node} is not in the payload (lowered to {sorted(counts)})"
    index = _labels(group).index(label)
    got, want = _run(group, dt)
    _assert_same(got[index], want[index], f"{group}[{dt}].{label}")


@pytest.mark.parametrize("group, dt", [pytest.param(g, dt, marks=_xfail(cls)) for g, cls in GROUPS.items()
                                       if cls.DYNAMIC for dt in cls.DTYPES[:2]])
def test_noncontiguous_inputs_default_precision(group, dt):
    """Transposed (non-contiguous) input tensors give the same results, with the
    runtime's default precision."""
    got, want = _run(group, dt, "noncontiguous", "auto")
    for k, label in enumerate(_labels(group)):
        _assert_same(got[k], want[k], f"{group}[{dt}].{label} (non-contiguous inputs)")


def test_group_labels_match_outputs():
    """Each group's CHECKS line up with its outputs (one label per output)."""
    for name, cls in GROUPS.items():
        labels = _labels(name)
        inputs = cls.inputs(EXPORT_BATCH, DTYPES[cls.DTYPES[0]], _gen(0))
        with torch.no_grad():
            assert len(cls()(*inputs)) == len(labels), name


# --------------------------------------------------------------------------- handlers directly


class _Frame:
    """A stand-in for the interpreter's Frame (the registry.py contract)."""

    def __init__(self, **tensors):
        self.tensors = {k: mx.array(v) if not isinstance(v, mx.array) else v for k, v in tensors.items()}
        self.values = {}
        self.graph = NS(tensor_meta=[])

    def t(self, tid):
        return self.tensors[tid.idx]

    def set_t(self, tid, a):
        self.tensors[tid.idx] = a

    def set_v(self, vid, v):
        self.values[vid.idx] = v

    def int_(self, x):
        return self.values[x.vid.idx] if x.is_vid else int(x.literal)

    def float_(self, x):
        return self.values[x.vid.idx] if x.is_vid else float(x.literal)

    def dtype(self, code):
        from mlx_runtime.graph import mx_dtype

        return mx_dtype(code)


def _t(name):
    return NS(idx=name)


def _run_node(node_type, frame, **fields):
    from mlx_runtime import nodes  # noqa: F401 - registers the handlers
    from mlx_runtime.registry import HANDLERS

    fields = {k: (_t(v) if isinstance(v, str) else v) for k, v in fields.items()}
    fields.setdefault("out", _t("out"))
    HANDLERS[node_type](frame, NS(**fields))
    return frame.tensors.get("out")


def _np(a):
    return np.array(a.astype(mx.float32)) if a.dtype in (mx.bfloat16,) else np.array(a)


def test_median_follows_the_cpp_runtime():
    # No ATen op lowers to MedianNode; mlx::median (as ExecuTorch's runtime) averages
    # the two middle values of an even count.
    f = _Frame(x=mx.array([[4.0, 1.0, 3.0, 2.0], [5.0, 7.0, 6.0, 0.0]]))
    out = _run_node("MedianNode", f, x="x", axes=[-1], keepdims=True)
    assert out.shape == (2, 1) and np.allclose(_np(out), [[2.5], [5.5]])
    out = _run_node("MedianNode", f, x="x", axes=None, keepdims=False)
    assert out.shape == () and float(out.item()) == 3.5


def test_zero_dim_operand_does_not_promote_a_dimensioned_one():
    # torch: fp16[n] + fp32[] -> fp16; int32[n] + int64[] -> int32; int32[n] * fp32[] -> fp32;
    # bool[n] + int64[] -> int64
    cases = [(mx.float16, mx.float32, mx.float16), (mx.int32, mx.int64, mx.int32),
             (mx.int32, mx.float32, mx.float32), (mx.bool_, mx.int64, mx.int64),
             (mx.bfloat16, mx.float16, mx.bfloat16)]
    for tensor_dt, scalar_dt, want in cases:
        f = _Frame(a=mx.array([1, 2, 3]).astype(tensor_dt), b=mx.array(2).astype(scalar_dt))
        for node in ("AddNode", "MultiplyNode", "MaximumNode"):
            assert _run_node(node, f, a="a", b="b").dtype == want, (node, tensor_dt, scalar_dt)
        assert _run_node(node, f, a="b", b="a").dtype == want
        assert _run_node("WhereNode", f, condition="a", x="a", y="b").dtype == want
    # both 0-d: ordinary promotion
    f = _Frame(a=mx.array(1, dtype=mx.float16), b=mx.array(2.0))
    assert _run_node("AddNode", f, a="a", b="b").dtype == mx.float32
    # comparisons happen in the promoted type: fp16 1/3 vs fp32 1/3 compare in fp16
    third = 1.0 / 3.0
    f = _Frame(a=mx.array([third], dtype=mx.float16), b=mx.array(third))
    assert bool(_run_node("EqualNode", f, a="a", b="b").item()) == bool(
        (torch.tensor([third], dtype=torch.float16) == torch.tensor(third)).item())


def test_float_floor_divide_is_torch_div_floor():
    a = np.array([1.0, -1.0, 1.0, -1.0, 0.0, -0.0, 5.0, 7.5, -7.5, 3.0], dtype=np.float32)
    b = np.array([0.1, 0.1, -0.1, -0.1, 3.0, 3.0, 0.0, 2.5, 2.5, -0.0], dtype=np.float32)
    out = _run_node("FloorDivideNode", _Frame(a=a, b=b), a="a", b="b")
    want = torch.floor_divide(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    got = np.array(out)
    assert np.array_equal(got, want, equal_nan=True), (got, want)
    assert np.array_equal(np.signbit(got), np.signbit(want))


def test_cumsum_flags_and_half_accumulation():
    x = mx.array([[1, 2, 3, 4]], dtype=mx.int32)
    f = _Frame(x=x)
    for reverse, inclusive, want in [(False, True, [1, 3, 6, 10]), (False, False, [0, 1, 3, 6]),
                                     (True, True, [10, 9, 7, 4]), (True, False, [9, 7, 4, 0])]:
        out = _run_node("CumsumNode", f, x="x", axis=-1, reverse=reverse, inclusive=inclusive)
        assert out.dtype == mx.int64 and np.array(out).tolist() == [want]
    # a bf16 running sum accumulated in bf16 stalls at 32; torch accumulates in float
    f = _Frame(x=mx.full((4096,), 0.1, dtype=mx.bfloat16))
    out = _run_node("CumsumNode", f, x="x", axis=0, reverse=False, inclusive=True)
    want = torch.full((4096,), 0.1, dtype=torch.bfloat16).cumsum(0)
    assert out.dtype == mx.bfloat16
    assert float(out[-1].item()) == float(want[-1])


def test_round_decimals_and_integer_identity():
    f = _Frame(x=mx.array([1.2345, 2.5, -0.125, 0.5]), i=mx.array([3, -4], dtype=mx.int64))
    out = _run_node("RoundNode", f, x="x", decimals=2)
    assert np.allclose(np.array(out), torch.round(torch.tensor([1.2345, 2.5, -0.125, 0.5]), decimals=2).numpy())
    out = _run_node("RoundNode", f, x="x", decimals=0)
    assert np.array(out).tolist() == [1.0, 2.0, -0.0, 0.0]  # half to even
    out = _run_node("RoundNode", f, x="i", decimals=0)
    assert out.dtype == mx.int64 and np.array(out).tolist() == [3, -4]


def test_logsumexp_empty_axes_reduce_all_and_keepdims():
    x = np.array([[0.0, 1.0], [2.0, 3.0]], dtype=np.float32)
    f = _Frame(x=x)
    out = _run_node("LogSumExpNode", f, x="x", axes=[], keepdims=False)
    assert out.shape == () and math.isclose(out.item(), float(torch.logsumexp(torch.from_numpy(x), (0, 1))),
                                            rel_tol=1e-6)
    out = _run_node("SumNode", f, x="x", axes=[-1], keepdims=True)
    assert out.shape == (2, 1)


def test_any_all_keep_uint8_and_float_inputs():
    f = _Frame(u=mx.array([[0, 3], [0, 0]], dtype=mx.uint8), x=mx.array([[0.0, -0.5], [0.0, 0.0]]))
    out = _run_node("AnyNode", f, x="u", axes=[-1], keepdims=False)
    assert out.dtype == mx.uint8 and np.array(out).tolist() == [1, 0]  # torch.any(uint8) is uint8
    out = _run_node("AllNode", f, x="x", axes=None, keepdims=False)
    assert out.dtype == mx.bool_ and out.item() is False


def test_empty_reductions_without_identity_raise():
    f = _Frame(x=mx.zeros((3, 0)))
    for node in ("MaxNode", "MinNode", "MedianNode"):
        with pytest.raises(ValueError):
            _run_node(node, f, x="x", axes=[-1], keepdims=False)
        assert _run_node(node, f, x="x", axes=[0], keepdims=True).shape == (1, 0)
    with pytest.raises(ValueError):
        _run_node("ArgmaxNode", f, x="x", axis=1, keepdims=False)
    assert _run_node("ArgminNode", f, x="x", axis=0, keepdims=False).dtype == mx.int64


def test_var_std_correction_edge_cases():
    x = np.array([[1.0, 2.0, 4.0]], dtype=np.float32)
    f = _Frame(x=x)
    for ddof in (0, 1, 2, 3, 4):
        got = _run_node("VarNode", f, x="x", axes=[-1], keepdims=False, ddof=ddof)
        want = torch.var(torch.from_numpy(x), -1, correction=ddof)
        assert np.allclose(np.array(got), want.numpy(), equal_nan=True), ddof
        got = _run_node("StdNode", f, x="x", axes=[1], keepdims=True, ddof=ddof)
        want = torch.std(torch.from_numpy(x), 1, correction=ddof, keepdim=True)
        assert np.allclose(np.array(got), want.numpy(), equal_nan=True), ddof


def test_creation_without_dtype_and_arange_step_zero():
    f = _Frame(x=mx.zeros((2, 3), dtype=mx.bfloat16))
    out = _run_node("FullLikeNode", f, x="x", v=NS(is_vid=False, literal=1.5), scalar_type=None)
    assert out.dtype == mx.bfloat16 and out.shape == (2, 3)
    lit = lambda v: NS(is_vid=False, literal=v)  # noqa: E731
    out = _run_node("ARangeNode", f, start=lit(3), stop=lit(-4), step=lit(-2), scalar_type=None)
    assert np.array(out).tolist() == [3, 1, -1, -3]
    with pytest.raises(ValueError):
        _run_node("ARangeNode", f, start=lit(0), stop=lit(4), step=lit(0), scalar_type=None)
    f.values[0] = 5
    out = _run_node("FullNode", f, shape=[NS(is_vid=True, vid=NS(idx=0)), lit(2)], v=lit(1.0), scalar_type=11)
    assert out.dtype == mx.bool_ and out.shape == (5, 2) and bool(mx.all(out).item())


def test_scalar_int_ops_follow_python_and_int32():
    lit = lambda v: NS(is_vid=False, literal=v)  # noqa: E731
    f = _Frame()
    for node, a, b, want in [("FloorDivideIntNode", -7, 2, -4), ("FloorDivideIntNode", 7, -2, -4),
                             ("ModIntNode", -7, 3, 2), ("ModIntNode", 7, -3, -2), ("AddIntNode", 2, 3, 5),
                             ("SubtractIntNode", 2, 3, -1), ("MultiplyIntNode", -4, 3, -12)]:
        _run_node(node, f, a=lit(a), b=lit(b), out=NS(idx="v"))
        assert f.values["v"] == want, (node, a, b)
    with pytest.raises(ZeroDivisionError):
        _run_node("ModIntNode", f, a=lit(1), b=lit(0), out=NS(idx="v"))
    with pytest.raises(OverflowError):
        _run_node("MultiplyIntNode", f, a=lit(2**20), b=lit(2**12), out=NS(idx="v"))
