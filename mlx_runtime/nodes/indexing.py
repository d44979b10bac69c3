"""Indexing nodes: slices and slice updates, takes, gathers, scatters, sorts."""

from __future__ import annotations

import mlx.core as mx

from ..registry import handles
from .shape import attr, declared_dtype, lits, norm_axis


def _along(ndim: int, axis: int, index) -> tuple:
    return tuple(index if i == axis else slice(None) for i in range(ndim))


# -- slices ------------------------------------------------------------------------


@handles("SliceNode")
def slice_(frame, node):
    x = frame.t(node.x)
    axis = norm_axis(int(frame.int_(node.axis)), x.ndim, "Slice")
    step = int(node.step)
    if step == 0:
        raise ValueError("Slice: step must not be 0")
    # Python slice semantics (clamping, negative bounds, negative steps) are the
    # ones torch's slice and MLX's C++ slice apply.
    start, stop = int(frame.int_(node.start)), int(frame.int_(node.stop))
    frame.set_t(node.out, x[_along(x.ndim, axis, slice(start, stop, step))])


@handles("SliceUpdateNode")
def slice_update(frame, node):
    dst, upd = frame.t(node.dst), frame.t(node.update)
    axis = norm_axis(int(frame.int_(node.axis)), dst.ndim, "SliceUpdate")
    step = int(node.step)
    if step < 1:
        raise ValueError(f"SliceUpdate: step must be >= 1, got {step}")
    dim = dst.shape[axis]
    start, stop = int(frame.int_(node.start)), int(frame.int_(node.stop))
    start = min(max(start + dim if start < 0 else start, 0), dim)
    stop = min(max(stop + dim if stop < 0 else stop, 0), dim)
    if start >= stop:
        frame.set_t(node.out, dst)
        return
    if upd.dtype != dst.dtype:
        upd = upd.astype(dst.dtype)
    # A new handle on dst (no copy): item assignment rebinds only this handle, and
    # the static SliceUpdate it builds donates dst's buffer when nothing else holds it.
    out = mx.array(dst)
    out[_along(dst.ndim, axis, slice(start, stop, step))] = upd
    frame.set_t(node.out, out)


@handles("IndexCopyNode")
def index_copy(frame, node):
    # dst[..., indices[i], ...] = update[..., i, ...] along axis, as one scatter
    # (the C++ runtime reads the indices on the host to find contiguous runs;
    # a scatter keeps this lazy).
    dst, upd, idx = frame.t(node.dst), frame.t(node.update), frame.t(node.indices)
    if idx.ndim != 1:
        raise ValueError("IndexCopy: indices must be 1-D")
    axis = norm_axis(int(node.axis), dst.ndim, "IndexCopy")
    dim = dst.shape[axis]
    idx = mx.where(idx < 0, idx + dim, idx)
    moved = mx.moveaxis(dst, axis, 0)
    out = mx.array(moved)
    out[idx] = mx.moveaxis(upd, axis, 0).astype(dst.dtype)
    frame.set_t(node.out, mx.moveaxis(out, 0, axis))


# -- takes and gathers ----------------------------------------------------------------


@handles("TakeNode")
def take(frame, node):
    x = frame.t(node.x)
    axis = norm_axis(int(node.axis), x.ndim, "Take")
    kind = int(node.index.kind)
    if kind == 2:
        frame.set_t(node.out, mx.take(x, frame.t(node.index.tid), axis=axis))
        return
    if kind not in (0, 1):
        raise ValueError(f"Take: invalid index kind {kind}")
    index = int(node.index.literal) if kind == 0 else int(frame.v(node.index.vid))
    size = x.shape[axis]
    if not -size <= index < size:
        raise IndexError(f"Take: index {index} out of range for size {size}")
    frame.set_t(node.out, mx.take(x, index + size if index < 0 else index, axis=axis))


@handles("TakeAlongAxisNode")
def take_along_axis(frame, node):
    frame.set_t(node.out, mx.take_along_axis(frame.t(node.x), frame.t(node.indices),
                                             axis=int(node.axis)))


@handles("GatherNode")
def gather(frame, node):
    # mlx::gather(x, indices, axes, slice_sizes): out shape is
    # broadcast(indices).shape + slice_sizes, slice i starting at the indexed
    # position on `axes` and at 0 elsewhere.
    x = frame.t(node.x)
    indices = [frame.t(t) for t in node.indices]
    axes = [norm_axis(a, x.ndim, "Gather") for a in lits(node.axes)]
    sizes = lits(attr(node, "slice_sizes"))
    if len(indices) != len(axes):
        raise ValueError(f"Gather: {len(indices)} index tensors for {len(axes)} axes")
    if len(sizes) != x.ndim:
        raise ValueError(f"Gather: {len(sizes)} slice sizes for rank {x.ndim}")
    if any(sizes[a] != 1 for a in axes):
        # The lowering only emits 1 on indexed axes; a wider window would need
        # an arange per indexed axis.
        raise NotImplementedError("Gather: slice size other than 1 on an indexed axis")
    others = [i for i in range(x.ndim) if i not in axes]
    xt = mx.transpose(x, axes + others) if axes + others != list(range(x.ndim)) else x
    idx_shape = mx.broadcast_shapes(*[tuple(i.shape) for i in indices]) if indices else ()
    picked = xt[tuple(indices) + tuple(slice(0, sizes[o]) for o in others)]
    frame.set_t(node.out, mx.reshape(picked, list(idx_shape) + sizes))


@handles("ScatterAddNode")
def scatter_add(frame, node):
    # torch.scatter_add / mlx::scatter_add_axis: out[.., idx[i,j,k], ..] += upd[i,j,k]
    # over the index tensor's extent.
    x, idx, upd = frame.t(node.x), frame.t(node.indices), frame.t(node.updates)
    axis = norm_axis(int(node.axis), x.ndim, "ScatterAdd")
    if idx.ndim != x.ndim:
        raise ValueError("ScatterAdd: indices need the input's rank")
    if tuple(upd.shape) != tuple(idx.shape):
        upd = upd[tuple(slice(0, s) for s in idx.shape)]
    if idx.size == 0:
        frame.set_t(node.out, x)
        return
    grid = []
    for d in range(x.ndim):
        if d == axis:
            grid.append(mx.where(idx < 0, idx + x.shape[axis], idx))
        else:
            shape = [1] * x.ndim
            shape[d] = idx.shape[d]
            grid.append(mx.broadcast_to(mx.arange(idx.shape[d]).reshape(shape), idx.shape))
    frame.set_t(node.out, x.at[tuple(grid)].add(upd.astype(x.dtype)))


# -- sorts --------------------------------------------------------------------------


def _indices(frame, tid, arr):
    # MLX returns uint32 indices; torch's are int64 and later nodes (and the
    # method's outputs) expect the declared type.
    want = declared_dtype(frame, tid) or mx.int64
    return arr if arr.dtype == want else arr.astype(want)


@handles("SortNode")
def sort(frame, node):
    frame.set_t(node.out, mx.sort(frame.t(node.x), axis=int(node.axis)))


@handles("ArgsortNode")
def argsort(frame, node):
    frame.set_t(node.out, _indices(frame, node.out, mx.argsort(frame.t(node.x), axis=int(node.axis))))


@handles("PartitionNode")
def partition(frame, node):
    frame.set_t(node.out, mx.partition(frame.t(node.x), int(frame.int_(node.kth)), axis=int(node.axis)))


@handles("ArgPartitionNode")
def argpartition(frame, node):
    out = mx.argpartition(frame.t(node.x), int(frame.int_(node.kth)), axis=int(node.axis))
    frame.set_t(node.out, _indices(frame, node.out, out))
