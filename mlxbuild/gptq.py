"""GPTQ (Frantar et al., 2022, arXiv:2210.17323) for the affine formats the MLX and XNNPACK
lowerings take: each linear's integer codes are chosen column by column, and the rounding
error of each column is spread over the columns not yet quantized, weighted by the inverse
Hessian of the layer's inputs on calibration data, so the layer's *outputs* on such inputs
move as little as the grid allows (plain rounding minimises each weight's own error).

Written here rather than taken from ``torchao.prototype.gptq`` (torchao 0.18): that one runs
on CUDA only and emits ``Int4Tensor``/``Int8Tensor`` (mslk layouts), which neither the MLX
nor the XNNPACK lowering takes. The codes and scales computed here replace those of the
torchao ``IntxUnpackedToInt8Tensor`` the scheme's config produced, so everything downstream
(export, lowering, the per-layer record) is unchanged. The grid is the one the scheme's
config chose (HQQ's scales, zero point 0): GPTQ picks the codes on it. (GPTQ's own min/max
grids, made as each group is reached, did worse than HQQ rounding at 2 bits on the tiny
test model: KL 3.54 against 2.87; on HQQ's grid it gives 2.39, and 0.222 against 0.280 at 4.)

Hessians are collected in one pass of the float model over the calibration tokens (not
layer by layer on quantized inputs, as torchao's default): 4·k² bytes per linear of input
width k are held until its layer is quantized.
"""

from __future__ import annotations

import torch

from mlxbuild import calibration


def hessians(model, names: list[str], batches: torch.Tensor) -> dict[str, torch.Tensor]:
    """X^T X of each named linear's input over ``batches`` [B, T] of token ids (float32,
    summed over every position), from forward pre-hooks on the float model."""
    out: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def collect(name, x):
        out[name] = out.get(name, 0) + x.T @ x
        counts[name] = counts.get(name, 0) + x.shape[0]

    calibration.feed(model, names, batches, collect)
    return {n: h / max(counts[n], 1) for n, h in out.items()}


def quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group: int,
             scales: torch.Tensor | None = None, percdamp: float = 0.01,
             block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int8, [n, k], within the ``bits``-wide signed range) and scales ([n, k // group])
    of ``weight`` [n, k] by GPTQ with lazy block updates of ``block`` columns; on the grid of
    ``scales`` when given, else on min/max grids made as each group is reached."""
    n, k = weight.shape
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    W = weight.detach().double().clone()
    H = hessian.detach().double().clone()
    dead = torch.diag(H) == 0  # an input never seen: its weights cannot matter, zero them
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(percdamp * H.diagonal().mean())
    # The upper Cholesky factor of H^-1: row i holds how column i's error moves the rest.
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    block = max(block, group) if group < k else block  # groups never straddle a block
    codes = torch.empty(n, k, dtype=torch.int8)
    fixed = scales is not None
    scales = scales.double().reshape(n, k // group).clone() if fixed else torch.empty(n, k // group, dtype=torch.float64)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        err = torch.zeros(n, b1 - b0, dtype=torch.float64)
        for j in range(b1 - b0):
            col = b0 + j
            if col % group == 0 and not fixed:
                amax = W[:, col:col + group].abs().amax(dim=1)
                scales[:, col // group] = (amax / ((qmax - qmin) / 2)).clamp(min=torch.finfo(torch.float32).eps)
            s = scales[:, col // group]
            w = W[:, col]
            q = torch.clamp(torch.round(w / s), qmin, qmax)
            codes[:, col] = q.to(torch.int8)
            e = (w - q * s) / U[col, col]
            W[:, col:b1] -= e[:, None] * U[col, col:b1][None, :]
            err[:, j] = e
        W[:, b1:] -= err @ U[b0:b1, b1:]
    return codes, scales


def apply(module, float_weight: torch.Tensor, hessian: torch.Tensor) -> None:
    """Replace the codes and scales of ``module``'s quantized weight (a torchao
    ``IntxUnpackedToInt8Tensor`` of a symmetric scheme) with GPTQ's for ``float_weight``,
    the weight it was quantized from."""
    w = module.weight
    bits = int(str(w.target_dtype).removeprefix("torch.int"))
    group = int(w.block_size[-1])
    codes, scales = quantize(float_weight, hessian, bits, group, scales=w.scale)
    w.qdata.copy_(codes.view_as(w.qdata))
    w.scale.copy_(scales.view_as(w.scale).to(w.scale.dtype))
