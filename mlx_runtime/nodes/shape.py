"""Shape and layout nodes: views, reshapes, joins, splits, pads, flips, triangles.

Also the small helpers the other families of this runtime share (``ints``,
``norm_axis``, ``text``, ``declared_dtype``).
"""

from __future__ import annotations

import mlx.core as mx

from ..registry import handles


# -- helpers shared by the node families ------------------------------------


def ints(frame, values) -> list[int]:
    """A ``[IntOrVid]`` vector resolved to Python ints (None -> [])."""
    return [int(frame.int_(v)) for v in (values or ())]


def lits(values) -> list[int]:
    """A scalar vector (object API gives a list or a numpy array, or None)."""
    return [] if values is None else [int(v) for v in values]


_SPELLING: dict[tuple[type, str], str] = {}


def attr(node, name: str):
    """A field of an object-API table by its schema (snake_case) name; flatc's
    Python object API spells multi-word fields in camelCase (``sliceSizes``)."""
    key = (type(node), name)
    spelled = _SPELLING.get(key)
    if spelled is None:
        if hasattr(node, name):
            spelled = name
        else:
            head, *rest = name.split("_")
            spelled = head + "".join(w[:1].upper() + w[1:] for w in rest)
            if not hasattr(node, spelled):
                raise AttributeError(f"{type(node).__name__} has no field {name!r}")
        _SPELLING[key] = spelled
    return getattr(node, spelled)


def text(value) -> str:
    """A flatbuffer string field (object API gives bytes)."""
    return value.decode() if isinstance(value, (bytes, bytearray)) else (value or "")


def norm_axis(axis: int, ndim: int, what: str) -> int:
    if not -ndim <= axis < max(ndim, 1):
        raise IndexError(f"{what}: axis {axis} out of range for rank {ndim}")
    return axis + ndim if axis < 0 else axis


def declared_dtype(frame, tid):
    """The dtype the graph declares for a tensor slot, or None (temporaries carry
    no metadata)."""
    metas = attr(frame.graph, "tensor_meta") or ()
    if tid is None or tid.idx >= len(metas) or metas[tid.idx] is None:
        return None
    try:
        return frame.dtype(attr(metas[tid.idx], "scalar_type"))
    except Exception:  # an unknown / unset scalar type: no declaration
        return None


# -- identity ----------------------------------------------------------------


@handles("NoopNode")
def noop(frame, node):
    pass


@handles("IdCopyNode")
def id_copy(frame, node):
    frame.set_t(node.out, frame.t(node.x))


@handles("ContiguousNode")
def contiguous(frame, node):
    frame.set_t(node.out, mx.contiguous(frame.t(node.x)))


# -- reshapes and views ---------------------------------------------------------


@handles("ReshapeNode")
def reshape(frame, node):
    frame.set_t(node.out, mx.reshape(frame.t(node.x), ints(frame, node.shape)))


@handles("TransposeNode")
def transpose(frame, node):
    frame.set_t(node.out, mx.transpose(frame.t(node.x), lits(node.perm)))


@handles("AsStridedNode")
def as_strided(frame, node):
    # Element strides over the row-major (contiguous) layout of x, as MLX and
    # the pooling lowering that emits this node assume.
    x = frame.t(node.x)
    frame.set_t(node.out, mx.as_strided(x, ints(frame, node.shape), ints(frame, node.strides),
                                        int(node.offset or 0)))


@handles("ExpandDimsNode")
def expand_dims(frame, node):
    frame.set_t(node.out, mx.expand_dims(frame.t(node.x), int(node.axis)))


@handles("SqueezeNode")
def squeeze(frame, node):
    x = frame.t(node.x)
    dims = lits(node.dims)
    if not dims:
        frame.set_t(node.out, mx.squeeze(x))
        return
    # torch semantics: squeezing a dim that is not of size 1 is a no-op.
    keep = sorted({norm_axis(d, x.ndim, "Squeeze") for d in dims if -x.ndim <= d < x.ndim
                   and x.shape[d] == 1})
    frame.set_t(node.out, mx.squeeze(x, keep) if keep else x)


@handles("BroadcastToNode")
def broadcast_to(frame, node):
    x = frame.t(node.x)
    shape = ints(frame, node.shape)
    # torch expand: -1 keeps the input's size; dims align from the right.
    lead = len(shape) - x.ndim
    for i, s in enumerate(shape):
        if s == -1:
            if i - lead < 0:
                raise ValueError("BroadcastTo: -1 for a new leading dimension")
            shape[i] = x.shape[i - lead]
    frame.set_t(node.out, mx.broadcast_to(x, shape))


@handles("TileNode")
def tile(frame, node):
    frame.set_t(node.out, mx.tile(frame.t(node.x), ints(frame, node.reps)))


@handles("RepeatNode")
def repeat(frame, node):
    repeats = int(frame.int_(node.repeats))
    if repeats < 0:
        raise ValueError(f"Repeat: repeats must be non-negative, got {repeats}")
    frame.set_t(node.out, mx.repeat(frame.t(node.x), repeats, int(node.axis)))


@handles("PadNode")
def pad(frame, node):
    x = frame.t(node.x)
    flat = ints(frame, attr(node, "pad_width"))
    if len(flat) % 2:
        raise ValueError(f"Pad: pad_width needs an even length, got {len(flat)}")
    pairs = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
    mode = text(node.mode)
    if mode not in ("constant", "edge"):
        raise ValueError(f"Pad: unsupported mode {mode!r}")
    # torch.nn.functional.pad allows negative widths (cropping); mlx.pad does not:
    # pad the positive part, then crop.
    grow = [(max(b, 0), max(a, 0)) for b, a in pairs]
    if any(b or a for b, a in grow):
        if mode == "constant":
            x = mx.pad(x, grow, constant_values=mx.array(attr(node, "constant_value"), dtype=x.dtype))
        else:
            x = mx.pad(x, grow, mode="edge")
    if any(b < 0 or a < 0 for b, a in pairs):
        x = x[tuple(slice(-min(b, 0), x.shape[i] + min(a, 0)) for i, (b, a) in enumerate(pairs))]
    frame.set_t(node.out, x)


# -- joins and splits ----------------------------------------------------------


@handles("ConcatenateNode")
def concatenate(frame, node):
    frame.set_t(node.out, mx.concatenate([frame.t(t) for t in node.tensors], axis=int(node.axis)))


@handles("StackNode")
def stack(frame, node):
    frame.set_t(node.out, mx.stack([frame.t(t) for t in node.tensors], axis=int(node.axis)))


@handles("SplitNode")
def split(frame, node):
    x = frame.t(node.x)
    axis = norm_axis(int(node.axis), x.ndim, "Split")
    sizes = ints(frame, node.sizes)
    dim = x.shape[axis]
    if len(sizes) == 1:
        # One value is torch.split's chunk size: [3, 3, 3, 1] for 10 by 3.
        if sizes[0] <= 0:
            raise ValueError(f"Split: split_size must be positive, got {sizes[0]}")
        cuts = list(range(sizes[0], dim, sizes[0]))
    else:
        cuts, acc = [], 0
        for s in sizes[:-1]:
            acc += s
            cuts.append(acc)
    parts = mx.split(x, cuts, axis=axis) if cuts else [x]
    outs = list(node.outs)
    if len(parts) != len(outs):
        raise ValueError(f"Split: {len(parts)} chunks for {len(outs)} outputs")
    for tid, part in zip(outs, parts):
        frame.set_t(tid, part)


# -- reorderings ----------------------------------------------------------------


@handles("FlipNode")
def flip(frame, node):
    x = frame.t(node.x)
    axes = {norm_axis(a, x.ndim, "Flip") for a in lits(node.axes)}
    if axes:
        x = x[tuple(slice(None, None, -1) if i in axes else slice(None) for i in range(x.ndim))]
    frame.set_t(node.out, x)


@handles("RollNode")
def roll(frame, node):
    shifts, axes = ints(frame, node.shift), lits(node.axes)
    if len(shifts) != len(axes):
        raise ValueError(f"Roll: {len(shifts)} shifts for {len(axes)} axes")
    frame.set_t(node.out, mx.roll(frame.t(node.x), tuple(shifts), tuple(axes)))


# -- triangles -------------------------------------------------------------------


@handles("TriNode")
def tri(frame, node):
    n, m = int(frame.int_(node.n)), int(frame.int_(node.m))
    frame.set_t(node.out, mx.tri(n, m, int(node.k), dtype=frame.dtype(attr(node, "scalar_type"))))


def _band(x, k: int, lower: bool):
    # mx.tril / mx.triu need a floating/int array of rank >= 2; build the mask
    # ourselves so bool and every batch rank work the same way.
    rows, cols = x.shape[-2], x.shape[-1]
    keep = mx.tri(rows, cols, k, dtype=mx.bool_)
    if not lower:
        keep = mx.logical_not(mx.tri(rows, cols, k - 1, dtype=mx.bool_))
    return mx.where(keep, x, mx.zeros((), dtype=x.dtype))


@handles("TrilNode")
def tril(frame, node):
    frame.set_t(node.out, _band(frame.t(node.x), int(node.k), lower=True))


@handles("TriuNode")
def triu(frame, node):
    frame.set_t(node.out, _band(frame.t(node.x), int(node.k), lower=False))
