"""Matmuls: dense (Addmm), quantized (QuantizedMatmul, Dequantize) and the gathered
MoE forms (GatherMm, GatherQmm).

Quantized weights arrive in MLX's own format (packed uint32 words, per-group
scales and, for affine, biases); scale dtypes are kept as the payload gives them.
"""

from __future__ import annotations

import mlx.core as mx

from ..registry import handles
from .shape import attr, text


def _opt(frame, tid):
    return None if tid is None else frame.t(tid)


def _sorted(frame, node) -> bool:
    flag = attr(node, "sorted_indices_flag")
    if flag is not None:  # a runtime override, newer than the static bool
        return int(frame.int_(flag)) != 0
    return bool(attr(node, "sorted_indices"))


@handles("AddmmNode")
def addmm(frame, node):
    a, b = frame.t(node.mat1), frame.t(node.mat2)
    alpha, beta = float(node.alpha), float(node.beta)
    if node.bias is None:
        out = mx.matmul(a, b)
        frame.set_t(node.out, out if alpha == 1.0 else out * alpha)
        return
    c = frame.t(node.bias)
    if c.dtype != a.dtype:
        c = c.astype(a.dtype)
    frame.set_t(node.out, mx.addmm(c, a, b, alpha=alpha, beta=beta))


@handles("QuantizedMatmulNode")
def quantized_matmul(frame, node):
    frame.set_t(node.out, mx.quantized_matmul(
        frame.t(node.x), frame.t(node.w), frame.t(node.scales), _opt(frame, node.biases),
        transpose=bool(node.transpose), group_size=int(attr(node, "group_size")), bits=int(node.bits),
        mode=text(node.mode)))


@handles("DequantizeNode")
def dequantize(frame, node):
    dtype = None if node.dtype is None else frame.dtype(node.dtype)
    frame.set_t(node.out, mx.dequantize(
        frame.t(node.w), frame.t(node.scales), _opt(frame, node.biases),
        group_size=int(attr(node, "group_size")), bits=int(node.bits), mode=text(node.mode),
        global_scale=_opt(frame, attr(node, "global_scale")), dtype=dtype))


@handles("GatherMmNode")
def gather_mm(frame, node):
    frame.set_t(node.out, mx.gather_mm(
        frame.t(node.a), frame.t(node.b), _opt(frame, attr(node, "lhs_indices")),
        _opt(frame, attr(node, "rhs_indices")), sorted_indices=_sorted(frame, node)))


@handles("GatherQmmNode")
def gather_qmm(frame, node):
    frame.set_t(node.out, mx.gather_qmm(
        frame.t(node.x), frame.t(node.w), frame.t(node.scales), _opt(frame, node.biases),
        lhs_indices=_opt(frame, attr(node, "lhs_indices")), rhs_indices=_opt(frame, attr(node, "rhs_indices")),
        transpose=bool(node.transpose), group_size=int(attr(node, "group_size")), bits=int(node.bits),
        mode=text(node.mode), sorted_indices=_sorted(frame, node)))
