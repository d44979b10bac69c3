"""Node handlers of the Python MLX runtime against torch eager, one node family at a time.

Each case builds a tiny module from the ATen op (or MLX custom op) that lowers to
the node under test, exports it (dynamic dims where the op allows), lowers it with
ExecuTorch's MLXPartitioner, serializes a .pte, runs it through
``mlx_runtime.load`` and compares with eager. Every case also asserts
the delegate payload holds the node it is about. Lowered programs are cached per
module, and ops are batched into few modules, to keep the file fast.

Families: shape (nodes/shape.py), indexing, conv, quantized/matmul, control.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.export import Dim, export

pytestmark = pytest.mark.filterwarnings("ignore")

FP = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(scope="module", autouse=True)
def _schema():
    from backends.mlx_schema import ensure_mlx_schema

    ensure_mlx_schema()
    import executorch.backends.mlx.custom_ops  # noqa: F401  (mlx:: ops)


# -- harness ---------------------------------------------------------------------


def payload_nodes(path) -> Counter:
    """Node type -> count over every MLX delegate payload (every chain) of a .pte."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    from mlx_runtime import fb
    from mlx_runtime.nodes.shape import attr

    program = deserialize_pte_binary(open(path, "rb").read()).program  # segments moved inline
    names = fb.node_type_names()
    found = Counter()
    for method in program.execution_plan:
        for d in method.delegates:
            if d.id != "MLXBackend":
                continue
            graph, _ = fb.read_payload(program.backend_delegate_data[d.processed.index].data)
            for chain in attr(graph, "instruction_chains"):
                for ins in chain.instructions:
                    found[names[attr(ins, "op_type")]] += 1
    return found


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    """``lowered(key, build)``: the .pte for ``build() -> (module, args, dynamic_shapes)``,
    exported and lowered once per key; returns (path, payload node counts)."""
    from backends.mlx import lower

    root = tmp_path_factory.mktemp("mlx_nodes")
    cache: dict = {}

    def get(key: str, build):
        if key not in cache:
            module, args, dynamic = build()
            if isinstance(module, Fn) and dynamic is not None:
                dynamic = (tuple(dynamic),)  # Fn.forward takes *args
            ep = export(module, args, dynamic_shapes=dynamic, strict=False)
            _, program = lower({"forward": ep}, {}, {})
            path = root / f"{key}.pte"
            path.write_bytes(program.buffer)
            cache[key] = (path, payload_nodes(path))
        return cache[key]

    return get


def run(path):
    from mlx_runtime import load

    return load(str(path))


def as_torch(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (int, float, bool)):
        return torch.tensor(x)
    import mlx.core as mx

    if isinstance(x, mx.array):
        if x.dtype == mx.bfloat16:
            return torch.from_numpy(np.array(x.astype(mx.float32))).to(torch.bfloat16)
        return torch.from_numpy(np.array(x))
    return torch.as_tensor(np.asarray(x))


def flat(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def tolerance(dtype) -> dict:
    return {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2)}.get(
        dtype, dict(rtol=1e-5, atol=1e-5))


def check(got, want, **tol):
    got, want = flat(got), flat(want)
    assert len(got) == len(want), f"{len(got)} outputs, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        g = as_torch(g)
        assert g.dtype == w.dtype, f"output {i}: dtype {g.dtype}, expected {w.dtype}"
        assert tuple(g.shape) == tuple(w.shape), f"output {i}: shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        torch.testing.assert_close(g, w, msg=lambda m, i=i: f"output {i}: {m}",
                                   **(tol or tolerance(w.dtype)))


def has_nodes(counts: Counter, *names: str):
    missing = [n for n in names if not counts.get(n)]
    assert not missing, f"payload lacks {missing}; it has {dict(counts)}"


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def rand(shape, dtype=torch.float32, gen=None):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    return torch.randint(-50, 50, shape, generator=gen).to(dtype)


# -- shape family ------------------------------------------------------------------------------


def shape_ops(x):
    b = x.shape[0]
    i, j = torch.split(x, [1, 3], dim=1)
    k, l, m = torch.split(x, 2, dim=-1)  # one chunk size: torch.split's split_size
    return (
        x.reshape(b, 24),                                   # Reshape (dynamic b)
        x.reshape(-1, 6),                                   # Reshape with -1
        x.permute(2, 0, 1),                                 # Transpose
        x.unsqueeze(-1), x.unsqueeze(1),                    # ExpandDims
        x[:, :1].squeeze(1), x[:, :1].squeeze(-2),          # Squeeze (negative dim)
        x[:, :1].expand(b, 3, 6), x[:, :1].expand(-1, -1, -1),  # BroadcastTo (-1 keeps)
        x.repeat(1, 2, 1),                                  # Tile
        x.repeat_interleave(2, dim=-1),                     # Repeat
        F.pad(x, (1, 2, -1, 1), value=1),                   # Pad, negative = crop
        i, j, k, l, m,                                      # Split (sizes and chunk size)
        torch.cat([x, x], dim=-1), torch.cat([i, j], dim=1),  # Concatenate
        torch.stack([x, x], dim=1), torch.stack([x, x], dim=-1),  # Stack
        torch.flip(x, [0, -1]),                             # Flip
        torch.roll(x, shifts=(1, -2), dims=(1, 2)),         # Roll
        torch.tril(x, -1), torch.triu(x, 1), torch.tril(x, 2),  # Tril / Triu
        x[:, 1:4:2, -3:],                                   # Slice: step, negative start
        x[:, :, 2:100],                                     # Slice: stop past the end
    )


SHAPE_NODES = ("ReshapeNode", "TransposeNode", "ExpandDimsNode", "SqueezeNode", "BroadcastToNode",
               "TileNode", "RepeatNode", "PadNode", "SplitNode", "ConcatenateNode", "StackNode",
               "FlipNode", "RollNode", "TrilNode", "TriuNode", "SliceNode")


def test_shape_ops_dynamic_batch(lowered):
    path, nodes = lowered("shape_f32", lambda: (Fn(shape_ops), (torch.randn(2, 4, 6),),
                                                ({0: Dim("b", min=1, max=8)},)))
    has_nodes(nodes, *SHAPE_NODES, "IdCopyNode")
    program = run(path)
    gen = torch.Generator().manual_seed(0)
    for x in (torch.randn(2, 4, 6, generator=gen), torch.randn(5, 4, 6, generator=gen),
              torch.randn(1, 4, 6, generator=gen),
              torch.randn(6, 4, 3, generator=gen).permute(2, 1, 0)):  # non-contiguous
        check(program.forward(x), shape_ops(x))


def test_shape_ops_empty_batch(lowered):
    path, nodes = lowered("shape_empty", lambda: (Fn(shape_ops), (torch.randn(0, 4, 6),), None))
    has_nodes(nodes, "TransposeNode", "PadNode", "SplitNode", "StackNode", "FlipNode", "TileNode")
    x = torch.randn(0, 4, 6)
    check(run(path).forward(x), shape_ops(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int32, torch.int64])
def test_shape_ops_dtypes(lowered, dtype):
    path, nodes = lowered(f"shape_{dtype}", lambda: (Fn(shape_ops), (rand((3, 4, 6), dtype),), None))
    has_nodes(nodes, *SHAPE_NODES)
    x = rand((3, 4, 6), dtype, torch.Generator().manual_seed(1))
    check(run(path).forward(x), shape_ops(x), rtol=0, atol=0)


def bool_ops(x):
    return torch.tril(x, 0), x.permute(1, 0), torch.flip(x, [1]), torch.cat([x, x]), x[1:, ::2]


def test_shape_ops_bool(lowered):
    path, nodes = lowered("shape_bool", lambda: (Fn(bool_ops), (rand((4, 5), torch.bool),), None))
    has_nodes(nodes, "TrilNode", "TransposeNode", "FlipNode", "ConcatenateNode", "SliceNode")
    x = rand((4, 5), torch.bool, torch.Generator().manual_seed(2))
    check(run(path).forward(x), bool_ops(x))


def pool_ops(x):
    # The general max/avg pooling lowering is a sliding-window AsStrided view.
    return F.max_pool2d(x, 3, 2, 1), F.avg_pool2d(x, 2, 2), F.max_pool1d(x.flatten(2), 4, 3)


def test_as_strided_via_pooling(lowered):
    path, nodes = lowered("pool", lambda: (Fn(pool_ops), (torch.randn(2, 3, 8, 8),), None))
    has_nodes(nodes, "AsStridedNode", "PadNode", "TransposeNode")
    program = run(path)
    x = torch.randn(2, 3, 8, 8)
    check(program.forward(x), pool_ops(x))
    xt = torch.randn(2, 8, 8, 3).permute(0, 3, 1, 2)  # non-contiguous input
    check(program.forward(xt), pool_ops(xt))


def copy_ops(x):
    # aten.copy into a fresh (delegated) tensor is the op the lowering turns into ContiguousNode.
    y = x.transpose(0, 1)
    return torch.ops.aten.copy(torch.zeros_like(y), y), x[0] + 1


def test_contiguous_and_idcopy(lowered):
    path, nodes = lowered("copy", lambda: (Fn(copy_ops), (torch.randn(3, 4),), ({1: Dim("n", min=1, max=9)},)))
    has_nodes(nodes, "ContiguousNode", "TransposeNode")
    program = run(path)
    for x in (torch.randn(3, 4), torch.randn(3, 7), torch.randn(7, 3).t()):
        check(program.forward(x), copy_ops(x))


# -- nodes no lowering emits: driven directly through their handler ------------------------------


class _Frame:
    """The Frame contract, just enough to call one handler on a hand-built node."""

    def __init__(self, graph=None):
        self.graph, self.tensors, self.values = graph, {}, {}

    def t(self, tid):
        return self.tensors[tid.idx]

    def set_t(self, tid, value):
        self.tensors[tid.idx] = value

    def v(self, vid):
        return self.values[vid.idx]

    def int_(self, x):
        from mlx_runtime.nodes.shape import attr

        return self.values[x.vid.idx] if attr(x, "is_vid") else x.literal

    def dtype(self, scalar_type):
        import mlx.core as mx

        return {3: mx.int32, 4: mx.int64, 5: mx.float16, 6: mx.float32, 11: mx.bool_, 15: mx.bfloat16}[scalar_type]


def _table(name, **fields):
    """An object-API table (``TriNodeT``...) with fields given by their schema names."""
    import importlib

    from mlx_runtime import fb

    fb.bindings()
    obj = getattr(importlib.import_module(f"{fb.PACKAGE}.{name}"), f"{name}T")()
    for key, value in fields.items():
        camel = key.split("_")[0] + "".join(w.title() for w in key.split("_")[1:])
        setattr(obj, key if hasattr(obj, key) else camel, value)
    return obj


def _tid(i):
    t = _table("Tid")
    t.idx = i
    return t


def _int(literal=None, vid=None):
    x = _table("IntOrVid")
    if vid is None:
        x.literal = literal
    else:
        x = _table("IntOrVid", vid=_table("Vid"), is_vid=True)
        x.vid.idx = vid
    return x


@pytest.mark.parametrize("n,m,k,st,dtype", [(4, 4, 0, 6, torch.float32), (3, 5, 1, 11, torch.bool),
                                             (5, 2, -1, 3, torch.int32), (0, 3, 0, 6, torch.float32)])
def test_tri_and_noop_handlers(n, m, k, st, dtype):
    # TriNode and NoopNode are in the schema but no ATen lowering emits them.
    from mlx_runtime.registry import HANDLERS

    import mlx_runtime.nodes  # noqa: F401

    frame = _Frame()
    frame.values[0] = m
    HANDLERS["TriNode"](frame, _table("TriNode", out=_tid(0), n=_int(n), m=_int(vid=0), k=k, scalar_type=st))
    HANDLERS["NoopNode"](frame, _table("NoopNode"))
    check(frame.tensors[0], torch.ones(n, m).tril(k).to(dtype))


# -- indexing family ------------------------------------------------------------------------------


def index_ops(x, i, j):
    s = torch.sort(x, -1)
    t = torch.topk(x, 2, dim=-1)
    upd = x[:, :1, :] * 2
    return (
        x.index_select(1, i), x.index_select(-1, i.flip(0)),  # Take (tensor index)
        x.select(0, -1), x.select(2, 3),                    # Take (literal index, negative)
        x[i, j],                                            # Gather (two index tensors)
        x.flatten()[i],                                     # TakeAlongAxis (1-D)
        s[0], s[1], torch.argsort(x, 0), torch.argsort(x, dim=-2),  # Sort / Argsort
        t[0], t[1],                                         # Partition / ArgPartition / TakeAlongAxis
        x.scatter_add(1, torch.tensor([[[0, 2, 2, 1, 0]], [[2, 2, 0, 1, 1]]]), upd),  # ScatterAdd
        x.scatter_add(-1, torch.tensor([[[4, 4, 0, 0, 0]]]).expand(2, 1, 5), upd),  # duplicates
        x.slice_scatter(upd, 1, 1, 2),                      # SliceUpdate
        x.slice_scatter(x[:, ::2, :] + 1, 1, 0, 3, 2),      # SliceUpdate with a step
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32])
def test_index_ops(lowered, dtype):
    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randperm(30, generator=g).reshape(2, 3, 5).to(dtype)  # no ties: sorts are unambiguous
        return x, torch.tensor([1, 0]), torch.tensor([2, -1])

    path, nodes = lowered(f"index_{dtype}", lambda: (Fn(index_ops), inputs(0), None))
    has_nodes(nodes, "TakeNode", "GatherNode", "TakeAlongAxisNode", "SortNode", "ArgsortNode",
              "PartitionNode", "ArgPartitionNode", "ScatterAddNode", "SliceUpdateNode")
    program = run(path)
    for seed in (0, 1):
        args = inputs(seed)
        check(program.forward(*args), index_ops(*args), rtol=0, atol=0)


def dynamic_index_ops(x, i, n):
    k = n.item()
    torch._check(k >= 0)
    torch._check(k < x.shape[1])
    return x.select(1, k), x.narrow(1, k, 1), x[:, k:k + 1], x.index_select(0, i)


def test_index_dynamic(lowered):
    # A runtime index (ItemInt -> Vid) for Take and Slice, and a dynamic row count.
    args = (torch.randn(4, 6), torch.tensor([3, 0, 3]), torch.tensor(2))
    path, nodes = lowered("index_dyn", lambda: (Fn(dynamic_index_ops), args,
                                                ({0: Dim("r", min=1, max=16)}, {0: Dim("q", min=1, max=8)}, None)))
    has_nodes(nodes, "TakeNode", "SliceNode")
    program = run(path)
    for x, i, n in (args, (torch.randn(9, 6), torch.tensor([8]), torch.tensor(5)),
                    (torch.randn(2, 6), torch.tensor([1, 1, 0, 1]), torch.tensor(0))):
        check(program.forward(x, i, n), dynamic_index_ops(x, i, n))


def _inner_gather(x, i, j):
    return x[:, i, j]


def _same_rank_index(x, i, j):
    return x[0][torch.stack([i, i.flip(0)])]


@pytest.mark.parametrize("fn,node", [
    pytest.param(_inner_gather, "GatherNode", marks=pytest.mark.xfail(strict=True, reason=(
        "ExecuTorch 1.5.1 lowers x[:, i, j] to GatherNode + ReshapeNode; mlx gather puts the index dims "
        "first ([n, 2, 1, 1]) and the reshape to [2, n] transposes them"))),
    pytest.param(_same_rank_index, "TakeAlongAxisNode", marks=pytest.mark.xfail(strict=True, reason=(
        "ExecuTorch 1.5.1 lowers x[idx] with idx.ndim == x.ndim to TakeAlongAxisNode, an elementwise "
        "gather; torch indexes whole rows ([3, 5][[2, 2]] -> [2, 2, 5])"))),
])
def test_index_lowerings_upstream_gets_wrong(lowered, fn, node):
    # The handlers follow MLX's node semantics, as the C++ runtime does; these two
    # aten.index.Tensor lowerings do not mean what torch means.
    args = (torch.arange(30.0).reshape(2, 3, 5), torch.tensor([1, 0]), torch.tensor([2, -1]))
    path, nodes = lowered(f"index_upstream_{node}", lambda: (Fn(fn), args, None))
    has_nodes(nodes, node)
    check(run(path).forward(*args), fn(*args))


class IndexCopyBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("data", torch.zeros(6, 4))

    def forward(self, idx, upd):
        self.data.index_copy_(0, idx, upd)
        return self.data + 0


def test_index_copy_mutable_buffer(lowered):
    path, nodes = lowered("index_copy", lambda: (IndexCopyBuffer(), (torch.tensor([4, 1]), torch.randn(2, 4)),
                                                 ({0: Dim("n", min=1, max=6)}, {0: Dim("n", min=1, max=6)})))
    has_nodes(nodes, "IndexCopyNode")
    program, eager = run(path), IndexCopyBuffer()
    for idx in ([4, 1], [0], [5, 2, 3], [1, 2, 3, 4, 5, 0]):  # state carries from call to call
        idx, upd = torch.tensor(idx), torch.randn(len(idx), 4)
        check(program.forward(idx, upd), eager(idx, upd))


class KVWrite(nn.Module):
    """mlx::kv_cache_update on a [B, H, S, D] buffer: a SliceUpdate with a runtime start."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(1, 2, 16, 4))

    def forward(self, new, pos):
        start = pos.item()
        torch._check(start >= 0)
        torch._check(start + new.shape[2] <= 16)
        torch.ops.mlx.kv_cache_update(self.cache, new, start)
        return self.cache * 1


def test_slice_update_runtime_start(lowered):
    args = (torch.randn(1, 2, 3, 4), torch.tensor(0))
    path, nodes = lowered("kv_write", lambda: (KVWrite(), args, ({2: Dim("t", min=1, max=16)}, None)))
    has_nodes(nodes, "SliceUpdateNode")
    program, eager = run(path), KVWrite()
    for t, pos in ((3, 0), (1, 3), (1, 4), (5, 5), (2, 14)):
        args = (torch.randn(1, 2, t, 4), torch.tensor(pos))
        check(program.forward(*args), eager(*args))


# -- conv family --------------------------------------------------------------------------------------


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2)
        self.c2 = nn.Conv2d(4, 6, 3, stride=(1, 2), padding=(1, 0), dilation=(2, 1))
        self.c3 = nn.Conv3d(4, 5, 2, stride=1, padding=1, bias=False)
        self.t1 = nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.t2 = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=(1, 0), dilation=(1, 2))
        self.t3 = nn.ConvTranspose3d(4, 3, 2, stride=(2, 1, 2), padding=(0, 1, 0))

    def forward(self, a, b, c):
        return self.c1(a), self.c2(b), self.c3(c), self.t1(a), self.t2(b), self.t3(c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_convolutions(lowered, dtype):
    torch.manual_seed(0)
    module = Convs().to(dtype)
    args = tuple(rand(s, dtype) for s in ((2, 4, 9), (2, 4, 7, 8), (2, 4, 3, 4, 5)))
    batch = Dim("n", min=1, max=4)
    path, nodes = lowered(f"conv_{dtype}", lambda: (module, args, ({0: batch}, {0: batch}, {0: batch})))
    has_nodes(nodes, "Conv1DNode", "Conv2DNode", "Conv3DNode", "ConvTranspose1DNode", "ConvTranspose2DNode",
              "ConvTranspose3DNode")
    program = run(path)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=6e-2)
    with torch.no_grad():
        check(program.forward(*args), module(*args), **tol)
        more = tuple(rand((3,) + tuple(a.shape[1:]), dtype) for a in args)
        check(program.forward(*more), module(*more), **tol)


# -- matmuls -----------------------------------------------------------------------------------------


def matmul_ops(a, b, c):
    return (torch.addmm(c, a, b, beta=0.5, alpha=2.0), torch.addmm(c, a, b), a @ b,
            torch.bmm(a[None], b[None]), F.linear(a, b.t(), c[0]))


@pytest.mark.parametrize("dtype", FP)
def test_addmm(lowered, dtype):
    args = tuple(rand(s, dtype) for s in ((3, 4), (4, 5), (3, 5)))
    rows = Dim("m", min=1, max=8)
    path, nodes = lowered(f"addmm_{dtype}", lambda: (Fn(matmul_ops), args, ({0: rows}, None, {0: rows})))
    has_nodes(nodes, "AddmmNode")
    program = run(path)
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-5)}.get(dtype, tolerance(dtype))
    check(program.forward(*args), matmul_ops(*args), **tol)
    more = tuple(rand(s, dtype) for s in ((7, 4), (4, 5), (7, 5)))
    check(program.forward(*more), matmul_ops(*more), **tol)


# -- quantized family ---------------------------------------------------------------------------------


class EmbedLinear(nn.Module):
    def __init__(self, dtype, vocab=64, dim=128, out=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim).to(dtype)
        self.lin = nn.Linear(dim, out).to(dtype)

    def forward(self, ids):
        return self.lin(self.emb(ids)), self.emb(ids)


QUANT = {
    "int4_g32": {"bits": 4, "group_size": 32},
    "int2_g64": {"bits": 2, "group_size": 64},
    "int8_g128": {"bits": 8, "group_size": 128},
    "int4_per_channel": {"bits": 4, "group_size": "per_channel"},
    "nvfp4": {"format": "nvfp4"},
}


@pytest.mark.parametrize("scheme,dtype", [("int4_g32", torch.float32), ("int2_g64", torch.float32),
                                          ("int8_g128", torch.float32), ("int4_per_channel", torch.float32),
                                          ("nvfp4", torch.float32), ("int4_g32", torch.bfloat16),
                                          ("int8_g128", torch.float16)])
def test_quantized_linear_and_embedding(lowered, scheme, dtype):
    from mlxbuild.quantize import apply_scheme

    torch.manual_seed(0)
    module = EmbedLinear(dtype)
    rule = QUANT[scheme]
    apply_scheme(module, {"linear": rule, "embedding": rule if rule.get("group_size") != "per_channel" else None})
    ids = torch.tensor([[1, 5, 63, 0]])
    path, nodes = lowered(f"quant_{scheme}_{dtype}",
                          lambda: (module, (ids,), ({1: Dim("t", min=1, max=16)},)))
    has_nodes(nodes, "QuantizedMatmulNode")
    if rule.get("group_size") != "per_channel":
        has_nodes(nodes, "DequantizeNode")
    program = run(path)
    tol = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=5e-3, atol=1e-2)}.get(
        dtype, dict(rtol=2e-2, atol=8e-2))
    with torch.no_grad():
        for ids in (torch.tensor([[1, 5, 63, 0]]), torch.tensor([[7]]), torch.arange(16).reshape(1, 16) * 4):
            check(program.forward(ids), module(ids), **tol)


def test_dequantize_standalone(lowered):
    # A group size the fused quantized matmul refuses (16) leaves dequantize_affine
    # on its own: DequantizeNode + a dense matmul.
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_api import IntxWeightOnlyConfig, quantize_

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 32))
    quantize_(module, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(16)))
    x = torch.randn(3, 64)
    path, nodes = lowered("dequant_g16", lambda: (module, (x,), ({0: Dim("m", min=1, max=8)},)))
    has_nodes(nodes, "DequantizeNode")
    with torch.no_grad():
        check(run(path).forward(x), module(x), rtol=1e-4, atol=1e-4)


class GatherMM(nn.Module):
    def __init__(self, experts=4, k=32, n=16, sort_flag=True):
        super().__init__()
        self.register_buffer("w", torch.randn(experts, n, k))
        self.register_buffer("flag", torch.ones((), dtype=torch.int32) if sort_flag else None)

    def forward(self, x, idx):
        return torch.ops.mlx.gather_mm(x.unsqueeze(-2), self.w.transpose(-1, -2), rhs_indices=idx,
                                       sorted_indices=self.flag).squeeze(-2)


class GatherQMM(nn.Module):
    """Experts quantized like ExecuTorch's MoE export (torchao 4-bit, group 32)."""

    def __init__(self, experts=4, k=64, n=32, group=32):
        super().__init__()
        from torchao.quantization.granularity import PerGroup
        from torchao.quantization.quant_api import IntxWeightOnlyConfig, quantize_

        linears = nn.ModuleList([nn.Linear(k, n, bias=False) for _ in range(experts)])
        quantize_(linears, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group)))
        self.register_buffer("qdata", torch.stack([e.weight.qdata for e in linears]))
        self.register_buffer("scale", torch.stack([e.weight.scale for e in linears]))
        self.register_buffer("zero_point", torch.stack([e.weight.zero_point for e in linears]))
        self.group = group

    def forward(self, x, idx):
        return torch.ops.mlx.gather_qmm(x.unsqueeze(-2), self.qdata, self.scale, biases=self.zero_point,
                                        rhs_indices=idx, group_size=self.group).squeeze(-2)


@pytest.mark.parametrize("kind", ["gather_mm", "gather_mm_unsorted", "gather_qmm"])
def test_gather_matmuls(lowered, kind):
    torch.manual_seed(0)
    module = {"gather_mm": lambda: GatherMM(), "gather_mm_unsorted": lambda: GatherMM(sort_flag=False),
              "gather_qmm": lambda: GatherQMM()}[kind]()
    k = 64 if kind == "gather_qmm" else 32
    args = (torch.randn(5, k), torch.tensor([0, 1, 1, 2, 3]))
    tokens = Dim("tokens", min=1, max=16)
    path, nodes = lowered(kind, lambda: (module, args, ({0: tokens}, {0: tokens})))
    has_nodes(nodes, "GatherQmmNode" if kind == "gather_qmm" else "GatherMmNode")
    program = run(path)
    with torch.no_grad():
        for n in (5, 1, 9):
            x, idx = torch.randn(n, k), torch.sort(torch.randint(0, 4, (n,)))[0]
            check(program.forward(x, idx), module(x, idx), rtol=1e-4, atol=1e-4)


# -- control family ------------------------------------------------------------------------------------


class Sample(nn.Module):
    def forward(self, logits, temperature, top_k, top_p, seed):
        return torch.ops.mlx.sample(logits, temperature, top_k, top_p, seed)


def test_if_and_random_bits_via_sampling(lowered):
    vocab = 50
    args = (torch.randn(2, vocab), torch.tensor(0.7), torch.tensor(1), torch.tensor(1.0), torch.tensor(3))
    path, nodes = lowered("sample", lambda: (Sample(), args, None))
    has_nodes(nodes, "IfNode", "RandomBitsNode", "SortNode", "TakeNode")
    program = run(path)
    logits = torch.randn(2, vocab)
    greedy = torch.argmax(logits, dim=-1)
    # temperature 0: the If takes the greedy branch; top_k 1: sampling can only pick the argmax.
    check(program.forward(logits, torch.tensor(0.0), torch.tensor(5), torch.tensor(1.0), torch.tensor(3)), greedy)
    check(program.forward(logits, torch.tensor(0.8), torch.tensor(1), torch.tensor(1.0), torch.tensor(3)), greedy)
    # Flat logits, keyed RNG: a seed always draws the same token, different seeds spread out.
    flat_logits = torch.zeros(2, vocab)
    draws = [int(as_torch(flat(program.forward(flat_logits, torch.tensor(1.0), torch.tensor(vocab),
                                                torch.tensor(1.0), torch.tensor(s)))[0])[0]) for s in range(16)]
    again = int(as_torch(flat(program.forward(flat_logits, torch.tensor(1.0), torch.tensor(vocab),
                                              torch.tensor(1.0), torch.tensor(5)))[0])[0])
    assert again == draws[5]
    assert all(0 <= d < vocab for d in draws) and len(set(draws)) >= 6, draws


class SampleUnseeded(nn.Module):
    def forward(self, logits, temperature, top_k):
        return torch.ops.mlx.sample(logits, temperature, top_k, torch.tensor(1.0), None)


def test_random_bits_global_generator(lowered):
    # No seed: RandomBits draws from MLX's global generator.
    vocab = 40
    args = (torch.randn(3, vocab), torch.tensor(1.0), torch.tensor(1))
    path, nodes = lowered("sample_unseeded", lambda: (SampleUnseeded(), args, None))
    has_nodes(nodes, "RandomBitsNode", "IfNode")
    program = run(path)
    check(program.forward(*args), torch.argmax(args[0], dim=-1))
    draws = {tuple(as_torch(flat(program.forward(torch.zeros(3, vocab), torch.tensor(1.0),
                                                 torch.tensor(vocab)))[0]).tolist()) for _ in range(4)}
    assert len(draws) > 1, draws


def test_random_bits_matches_mlx_key_stream():
    # random::bits(shape, 4, key) is random::split(key, n) laid out flat whenever the
    # byte count is a multiple of 8 -- the property the handler relies on.
    import mlx.core as mx

    from mlx_runtime.nodes.control import random_bits

    key = mx.random.key(1234)
    words = np.array(mx.random.split(key, 6)).reshape(-1)
    assert (np.array(random_bits([3, 4], 4, key)).reshape(-1) == words).all()
    assert (np.array(random_bits([24], 2, key)) == words.view(np.uint16)[:24]).all()
    assert np.array(random_bits([2, 5], 1, key)).dtype == np.uint8


class DeltaRule(nn.Module):
    def __init__(self, custom_kernel: bool):
        super().__init__()
        self.custom_kernel = custom_kernel
        self.register_buffer("state", torch.zeros(1, 2, 16, 32))

    def forward(self, q, k, v, g, beta):
        return torch.ops.mlx.gated_delta_rule(q, k, v, g, beta, self.state, use_custom_kernel=self.custom_kernel)


def _delta_inputs(t, gen):
    return (torch.randn(1, t, 2, 32, generator=gen) * 0.2, torch.randn(1, t, 2, 32, generator=gen) * 0.2,
            torch.randn(1, t, 2, 16, generator=gen), torch.rand(1, t, 2, generator=gen),
            torch.rand(1, t, 2, generator=gen))


@pytest.mark.parametrize("custom_kernel,node", [(False, "ScanNode"), (True, "MetalKernelNode")],
                         ids=["scan", "metal-kernel"])
def test_gated_delta_rule(lowered, custom_kernel, node):
    """As a Scan of mlx ops, or as ExecuTorch's fused Metal kernel (recognised by its source
    and computed with mlx ops off Apple GPUs, mlx_runtime.kernels), against the op's eager
    recurrence."""
    import executorch.backends.mlx.custom_kernel_ops.gated_delta_rule  # noqa: F401

    gen = torch.Generator().manual_seed(0)
    key = "delta_metal" if custom_kernel else "delta_scan"
    path, nodes = lowered(key, lambda: (DeltaRule(custom_kernel), _delta_inputs(3, gen), None))
    has_nodes(nodes, node)
    program, eager = run(path), DeltaRule(False)
    for _ in range(2):  # the recurrent state carries over to the second call
        args = _delta_inputs(3, gen)
        check(program.forward(*args), eager(*args), rtol=1e-4, atol=1e-5)


def test_an_unknown_metal_kernel_is_refused_without_metal(lowered, monkeypatch):
    import mlx.core as mx

    import executorch.backends.mlx.custom_kernel_ops.gated_delta_rule  # noqa: F401

    from mlx_runtime import kernels
    from mlx_runtime.registry import NodeUnsupported

    if mx.metal.is_available():
        pytest.skip("this host has Metal")
    # the same kernel with another source (here: no longer listed) is not run as this one
    monkeypatch.setattr(kernels, "KNOWN", {k: v for k, v in kernels.KNOWN.items() if k[0] != "gated_delta_step"})
    gen = torch.Generator().manual_seed(0)
    path, nodes = lowered("delta_metal", lambda: (DeltaRule(True), _delta_inputs(3, gen), None))
    has_nodes(nodes, "MetalKernelNode")
    with pytest.raises(Exception) as info:
        run(path).forward(*_delta_inputs(3, gen))
    causes = [info.value]
    while causes[-1].__cause__ is not None:
        causes.append(causes[-1].__cause__)
    assert any(isinstance(e, NodeUnsupported) for e in causes), causes
    assert "MetalKernelNode" in str(info.value) and "Metal device" in str(info.value)


class Attend(nn.Module):
    """Two layers over the off-graph KV cache (kvcache::update_and_attend)."""

    def __init__(self, out_dtype=torch.float32):
        super().__init__()
        self.out_dtype = out_dtype

    def forward(self, q, k, v, position):
        total = None
        for layer in range(2):
            out = torch.ops.kvcache.update_and_attend(q, k * (layer + 1), v * (layer + 1), position, layer,
                                                      8 ** -0.5, self.out_dtype)
            total = out if total is None else total + out
        return total


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_update_and_attend(lowered, out_dtype):
    import executorch.extension.llm.cache.update_and_attend as ua
    from executorch.extension.llm.cache.reference_cache import CacheConfig, ContiguousReferenceCache

    def step(t, start, gen):
        return (torch.randn(1, 4, t, 8, generator=gen), torch.randn(1, 2, t, 8, generator=gen),
                torch.randn(1, 2, t, 8, generator=gen),
                torch.arange(start, start + t, dtype=torch.int32).reshape(t, 1))

    gen = torch.Generator().manual_seed(0)
    seq = Dim("s", min=1, max=16)
    path, nodes = lowered(f"attend_{out_dtype}", lambda: (
        Attend(out_dtype), step(3, 0, gen), {"q": {2: seq}, "k": {2: seq}, "v": {2: seq}, "position": {0: seq}}))
    has_nodes(nodes, "UpdateAndAttendNode")
    program, eager = run(path), Attend(out_dtype)
    key = f"test-mlx-nodes-{out_dtype}"
    ua.REGISTRY.install(key, ContiguousReferenceCache(CacheConfig(n_layers=2, n_kv_heads=2, head_dim=8, capacity=16)))
    try:
        with ua.REGISTRY.active(key):
            start = 0
            for t in (3, 1, 1, 4):  # prefill, two decode steps, a chunked continuation
                args = step(t, start, gen)
                check(program.forward(*args), eager(*args), rtol=1e-3, atol=1e-3)
                start += t
    finally:
        ua.REGISTRY.uninstall(key)
