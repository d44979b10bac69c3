"""Control flow and stateful nodes: If, Scan, RandomBits, MetalKernel, UpdateAndAttend."""

from __future__ import annotations

import math
import os
import weakref

import mlx.core as mx

from .. import kernels
from ..registry import NodeUnsupported, handles
from .shape import attr, ints, lits, text


# -- control flow -----------------------------------------------------------------


@handles("IfNode")
def if_(frame, node):
    # Nonzero -> then chain, zero -> else chain; the chosen chain writes the
    # output slots itself.
    cond = int(frame.int_(node.cond))
    frame.run_chain(int(attr(node, "then_chain_idx" if cond != 0 else "else_chain_idx")))


@handles("ScanNode")
def scan(frame, node):
    # For t in range(T): sliced[i] = originals[i] taken at t on scan_axis; run
    # the body (which reads/writes the carry slots in place and writes one step
    # of each output); afterwards each output is the stack of its steps.
    originals, sliced, outputs = list(node.originals), list(node.sliced), list(node.outputs)
    if len(originals) != len(sliced):
        raise ValueError(f"Scan: {len(originals)} originals for {len(sliced)} sliced slots")
    if not originals:
        raise ValueError("Scan: nothing to scan over")
    axis = int(attr(node, "scan_axis"))
    xs = [frame.t(t) for t in originals]
    steps = xs[0].shape[axis]
    collected = [[] for _ in outputs]
    for t in range(steps):
        for tid, x in zip(sliced, xs):
            frame.set_t(tid, mx.take(x, t, axis=axis))
        frame.run_chain(int(attr(node, "body_chain_idx")))
        for acc, tid in zip(collected, outputs):
            acc.append(frame.t(tid))
    if steps == 0:
        raise ValueError("Scan: zero steps leave the outputs' shapes unknown")
    for acc, tid in zip(collected, outputs):
        frame.set_t(tid, mx.stack(acc, axis=axis))


# -- random bits --------------------------------------------------------------------

_DTYPE_OF_WIDTH = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32}


def random_bits(shape: list[int], width: int, key) -> mx.array:
    """``mlx::random::bits(shape, width, key)``, which the Python API does not expose.

    ``random.split(key, n)`` is ``bits({n, 2}, 4, key)``, and RandomBits' output
    depends only on the key and the byte count, so whenever the byte count is a
    multiple of 8 this reproduces the C++ runtime's bits exactly. Other sizes get
    the leading bytes of the next such draw: uniform bits, not bit-identical.
    """
    n = math.prod(shape)
    nbytes = n * width
    if nbytes == 0:
        return mx.zeros(shape, dtype=_DTYPE_OF_WIDTH[width])
    words = mx.random.split(key, (nbytes + 7) // 8).reshape(-1)
    out = words.view(_DTYPE_OF_WIDTH[width]) if width != 4 else words
    return out[:n].reshape(shape)


@handles("RandomBitsNode")
def random_bits_node(frame, node):
    width = int(node.width)
    if width not in _DTYPE_OF_WIDTH:
        raise ValueError(f"RandomBits: width must be 1, 2 or 4, got {width}")
    if node.seed is not None:
        key = mx.random.key(int(frame.v(node.seed)) & 0xFFFFFFFFFFFFFFFF)
    else:
        # MLX's global generator: draw a fresh key from it (honours mx.random.seed).
        key = mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)
    frame.set_t(node.out, random_bits(ints(frame, node.shape), width, key))


# -- custom Metal kernels ----------------------------------------------------------------

ALLOW_KERNELS_ENV = "MLXBUILD_ALLOW_METAL_KERNELS"


@handles("MetalKernelNode")
def metal_kernel(frame, node):
    name = text(node.name)
    lengths = lits(attr(node, "output_shape_lengths"))
    flat = ints(frame, attr(node, "output_shapes_flat"))
    if len(lengths) != len(node.outputs) or sum(lengths) != len(flat):
        raise ValueError(f"MetalKernelNode {name!r}: output shapes do not match the outputs")
    shapes, at = [], 0
    for n in lengths:
        shapes.append(flat[at:at + n])
        at += n
    names = [text(s) for s in attr(node, "template_arg_names") or ()]
    kinds, values = lits(attr(node, "template_arg_kinds")), lits(attr(node, "template_arg_values"))
    template = []
    for arg, kind, value in zip(names, kinds, values):
        template.append((arg, value if kind == 0 else bool(value) if kind == 1 else frame.dtype(value)))
    dtypes = [frame.dtype(d) for d in lits(attr(node, "output_dtypes"))]
    computed = None if mx.metal.is_available() else kernels.known(name, text(node.source), text(node.header))
    if computed is not None:  # one of ExecuTorch's own kernels, as mlx ops (mlx_runtime.kernels)
        results = computed([frame.t(t) for t in node.inputs], dict(template), shapes, dtypes)
        for tid, arr in zip(node.outputs, results):
            frame.set_t(tid, arr)
        return
    if not mx.metal.is_available():
        raise NodeUnsupported(
            f"MetalKernelNode {name!r}: a custom Metal kernel needs an Apple GPU; "
            "this host has no Metal device (MLX runs on the CPU here), and it is not one of "
            "ExecuTorch's kernels this runtime computes without one (mlx_runtime.kernels)")
    if os.environ.get(ALLOW_KERNELS_ENV) != "1":
        # ExecuTorch's runtime gates this behind a build flag: the .pte would run
        # arbitrary GPU code.
        raise NodeUnsupported(
            f"MetalKernelNode {name!r}: custom kernel execution is disabled "
            f"(set {ALLOW_KERNELS_ENV}=1 to let this .pte run its own GPU code)")
    grid, group = ints(frame, node.grid), ints(frame, node.threadgroup)
    if len(grid) != 3 or len(group) != 3:
        raise ValueError(f"MetalKernelNode {name!r}: grid and threadgroup need 3 entries")
    kernel = mx.fast.metal_kernel(
        name=name, input_names=[text(s) for s in attr(node, "input_names") or ()],
        output_names=[text(s) for s in attr(node, "output_names") or ()], source=text(node.source),
        header=text(node.header), ensure_row_contiguous=bool(attr(node, "ensure_row_contiguous")),
        atomic_outputs=bool(attr(node, "atomic_outputs")))
    results = kernel(
        inputs=[frame.t(t) for t in node.inputs], output_shapes=shapes,
        output_dtypes=dtypes, grid=tuple(grid),
        threadgroup=tuple(group), template=template or None, init_value=attr(node, "init_value"))
    for tid, arr in zip(node.outputs, results):
        frame.set_t(tid, arr)


# -- off-graph KV cache + attention ----------------------------------------------------


class ContiguousKVCache:
    """One sequence's K/V history per layer, [B, H_kv, cells, D], written at the
    step's position and read back from cell 0; the pool grows by doubling.

    The C++ runtime's MLXSequenceCache (flat layers) does the same; its ring
    (sliding-window) layers need the cache config the .pte does not carry.
    """

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.k: dict[int, mx.array] = {}
        self.v: dict[int, mx.array] = {}

    def reset(self):
        self.k.clear()
        self.v.clear()

    def _write(self, pool: dict, layer: int, position: int, new: mx.array) -> mx.array:
        end = position + new.shape[2]
        if self.capacity is not None and end > self.capacity:
            raise RuntimeError(f"KV cache overflow on layer {layer}: {end} cells > capacity {self.capacity}")
        buf = pool.get(layer)
        if buf is None or buf.shape[:2] != new.shape[:2] or buf.shape[3] != new.shape[3]:
            buf = mx.zeros((*new.shape[:2], 0, new.shape[3]), dtype=new.dtype)
        if buf.shape[2] < end:
            size = max(buf.shape[2], 1)
            while size < end:
                size *= 2
            if self.capacity is not None:
                size = min(size, self.capacity)
            pad = mx.zeros((*buf.shape[:2], size - buf.shape[2], buf.shape[3]), dtype=buf.dtype)
            buf = mx.concatenate([buf, pad], axis=2)
        if new.dtype != buf.dtype:
            new = new.astype(buf.dtype)
        buf = mx.array(buf)  # a new handle: item assignment leaves the old one alone
        buf[:, :, position:end, :] = new
        pool[layer] = buf
        return buf[:, :, :end, :]

    def update_and_fetch(self, layer: int, position: int, k: mx.array, v: mx.array):
        """(K, V, mask) for SDPA: history [0, position + T) and MLX's mask mode
        (none for one decode token, lower-right causal otherwise)."""
        keys = self._write(self.k, layer, position, k)
        values = self._write(self.v, layer, position, v)
        return keys, values, (None if k.shape[2] == 1 else "causal")


_caches: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def kv_cache(frame) -> ContiguousKVCache:
    """The cache this program's calls share: ``frame.kv_cache`` when the runtime
    installs one, else one per loaded graph."""
    cache = getattr(frame, "kv_cache", None)
    if cache is not None:
        return cache
    owner = frame.graph
    cache = _caches.get(owner)
    if cache is None:
        cache = _caches[owner] = ContiguousKVCache()
    return cache


def reset_kv_cache(frame_or_graph) -> None:
    """Forget the UpdateAndAttend history of a loaded graph (or of ``frame.kv_cache``);
    a runner's state reset should call this alongside zeroing its mutable buffers."""
    cache = getattr(frame_or_graph, "kv_cache", None) or _caches.get(getattr(frame_or_graph, "graph", frame_or_graph))
    if cache is not None:
        cache.reset()


@handles("UpdateAndAttendNode")
def update_and_attend(frame, node):
    layer_id, out_dtype = attr(node, "layer_id"), attr(node, "out_dtype")
    if layer_id is None:
        raise ValueError("UpdateAndAttend: layer_id is not set")
    if node.scale is None:
        raise ValueError("UpdateAndAttend: scale is not set")
    q = frame.t(node.q)
    pos = frame.t(node.position)
    if pos.dtype not in (mx.int32, mx.int64):
        raise TypeError(f"UpdateAndAttend: position must be int32 or int64, got {pos.dtype}")
    # The run's start is position[0], read on the host like the C++ runtime does
    # (the cache bookkeeping is integer work); an input, so this costs no graph split.
    position = int(pos.reshape(-1)[0].item())
    keys, values, mask = kv_cache(frame).update_and_fetch(
        int(layer_id), position, frame.t(node.k), frame.t(node.v))
    if keys.dtype != q.dtype:
        keys, values = keys.astype(q.dtype), values.astype(q.dtype)
    out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=float(node.scale), mask=mask)
    if out_dtype is not None:
        want = frame.dtype(out_dtype)
        if out.dtype != want:
            out = out.astype(want)
    frame.set_t(node.out, out)
