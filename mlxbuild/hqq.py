"""HQQ scale-only weight quantization a block of rows at a time: the torchao tensor
``quantize_`` makes for ``IntxWeightOnlyConfig`` / ``Int8DynamicActivationIntxWeightConfig``
with ``intx_choose_qparams_algorithm="hqq_scale_only"``, bit for bit.

Why not torchao's own function (``quant_primitives._choose_qparams_and_quantize_scale_only_hqq``):
it promotes the whole matrix to fp32 and runs each of its 20 iterations as eight or so passes
over matrix-sized fp32 temporaries. That is slow, because every pass goes to main memory
(836 s for Llama-3.1-8B's 32 layers, against 127 s here). It is also large, because
it keeps two more fp32 matrices and an int32 copy, which for Qwen3-0.6B's 151936 x 1024
embedding is 2.5 GB for a 311 MB bf16 tensor. Here the same arithmetic runs on blocks of rows
small enough to stay in the CPU's cache (``BLOCK_BYTES`` of fp32), several times faster
(``benchmarks/bench_hqq.py``).

Every group's scale depends only on its own 32 (or ``group_size``) values. The early stop is
still decided over all rows after each iteration, as torchao decides it. So the result is
the same (``tests/test_streaming.py`` compares the two bit for bit, across block sizes).
"""

from __future__ import annotations

import torch

# fp32 bytes per block of rows: about what a core's share of cache holds (1 MiB ran fastest
# of 256 KiB to 2 MiB on this 2-core host, at widths 1,024 to 14,336).
BLOCK_BYTES = 2**20
ITERS, EARLY_STOP_TOL = 20, 1e-5  # torchao's defaults, which quantize_ uses


def applies(module: torch.nn.Module, config) -> bool:
    """Whether ``config`` on ``module`` is the HQQ scale-only quantization this reproduces."""
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.quant_primitives import MappingType
    from torchao.quantization.quantize_.workflows.intx.intx_packing_format import IntxPackingFormat

    w = getattr(module, "weight", None)
    if w is None or w.dim() != 2 or not w.is_floating_point():
        return False
    if isinstance(config, IntxWeightOnlyConfig):
        mapping, scale_dtype = config.mapping_type, config.scale_dtype
    elif isinstance(config, Int8DynamicActivationIntxWeightConfig):
        mapping, scale_dtype = config.weight_mapping_type, config.weight_scale_dtype
    else:
        return False
    return (str(config.intx_choose_qparams_algorithm).lower().endswith("hqq_scale_only")
            and mapping == MappingType.SYMMETRIC and scale_dtype in (None, w.dtype)
            and config.intx_packing_format == IntxPackingFormat.UNPACKED_TO_INT8)


def quantize_module(module: torch.nn.Module, config) -> None:
    """Replace ``module.weight`` as torchao's handler for ``config`` would."""
    from torchao.quantization.granularity import PerAxis
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
    )

    w = module.weight.detach()
    dynamic = isinstance(config, Int8DynamicActivationIntxWeightConfig)
    weight_dtype = config.weight_dtype
    granularity = config.weight_granularity if dynamic else config.granularity
    group_size = w.shape[-1] if isinstance(granularity, PerAxis) else granularity.group_size
    qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[weight_dtype]
    qdata, scale = quantize(w, group_size, qmin, qmax)
    tensor = IntxUnpackedToInt8Tensor(
        qdata=qdata, scale=scale, zero_point=torch.zeros_like(scale, dtype=torch.int8),
        target_dtype=weight_dtype, block_size=(1, group_size), dtype=w.dtype,
        activation_quantization="int8_asym_per_token" if dynamic else None)
    module.weight = torch.nn.Parameter(tensor, requires_grad=False)


def quantize(w: torch.Tensor, group_size: int, qmin: int, qmax: int,
             rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(qdata int8 [n, k], scale [n, k // group_size] in ``w``'s dtype)."""
    n, k = w.shape
    rows = rows or max(1, BLOCK_BYTES // (4 * k))
    if k % group_size:
        raise ValueError(f"in_features={k} must be divisible by group_size={group_size}")
    groups = k // group_size
    eps = torch.finfo(torch.float32).eps
    qabs = max(abs(qmin), abs(qmax)) or 1
    spans = [(i, min(i + rows, n)) for i in range(0, n, rows)]

    def block(a: int, b: int) -> torch.Tensor:
        return w[a:b].to(torch.float32).contiguous().view(b - a, groups, group_size)

    scale = torch.empty(n, groups, dtype=torch.float32)
    for a, b in spans:
        scale[a:b] = (block(a, b).abs().amax(dim=2) / qabs).clamp_min(eps)
    # Two block-sized buffers reused in place: the same elementwise arithmetic, a quarter faster.
    q_buf = torch.empty(min(rows, n), groups, group_size)
    prod_buf = torch.empty_like(q_buf)
    for _ in range(max(1, ITERS)):
        new = torch.empty_like(scale)
        for a, b in spans:
            wg, s = block(a, b), scale[a:b]
            q, prod = q_buf[:b - a], prod_buf[:b - a]
            torch.div(wg, s.unsqueeze(-1), out=q).round_().clamp_(qmin, qmax)
            num = torch.mul(wg, q, out=prod).sum(dim=2, dtype=torch.float32)
            den = torch.mul(q, q, out=prod).sum(dim=2, dtype=torch.float32)
            new[a:b] = torch.where(den > 0, num / den, s).clamp_min(eps).abs()
        rel = ((new - scale).abs() / scale.clamp_min(eps)).max()
        scale = new
        if rel < EARLY_STOP_TOL:
            break
    qdata = torch.empty(n, k, dtype=torch.int8)
    for a, b in spans:
        q = (block(a, b) / scale[a:b].unsqueeze(-1)).round().clamp(qmin, qmax)
        qdata[a:b] = q.view(b - a, k).to(torch.int8)
    return qdata, scale.to(w.dtype)
