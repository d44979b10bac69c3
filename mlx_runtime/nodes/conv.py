"""Convolutions. The lowering hands over MLX's layout: input [N, *spatial, C_in],
weight [C_out, *K, C_in / groups] (the transposed ones too), out [N, *spatial, C_out];
bias and the channels-first <-> channels-last transposes are separate nodes."""

from __future__ import annotations

import mlx.core as mx

from ..registry import handles
from .shape import attr

_AXES = {1: "", 2: "hw", 3: "dhw"}


def _param(node, name: str, ndim: int):
    """``stride`` (1-D) or ``(stride_h, stride_w)`` / ``(stride_d, stride_h, stride_w)``."""
    if ndim == 1:
        return int(attr(node, name))
    return tuple(int(attr(node, f"{name}_{a}")) for a in _AXES[ndim])


def _conv(fn, ndim: int, transposed: bool):
    names = ("stride", "padding", "dilation") + (("output_padding",) if transposed else ())

    def run(frame, node):
        kwargs = {n: _param(node, n, ndim) for n in names}
        frame.set_t(node.out, fn(frame.t(node.x), frame.t(node.w), groups=int(node.groups), **kwargs))

    return run


for _ndim in (1, 2, 3):
    handles(f"Conv{_ndim}DNode")(_conv(getattr(mx, f"conv{_ndim}d"), _ndim, False))
    handles(f"ConvTranspose{_ndim}DNode")(_conv(getattr(mx, f"conv_transpose{_ndim}d"), _ndim, True))
