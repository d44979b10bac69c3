"""AWQ (Lin et al., 2023, arXiv:2306.00978) for Llama-style decoders: before rounding, each
group of linears that reads one input (q/k/v after the attention norm, gate/up after the
MLP norm, down after up, o after v) has its input channels scaled by s and the op that
produces that input divided by s, so the float model computes the same function while the
channels that carry large activations get finer steps on the quantization grid. s weighs
each channel's mean activation against its weights' (see ``_search``), with the exponent
searched on calibration inputs for the smallest output error of the group's linears as the
scheme rounds them.

Written here rather than taken from ``torchao.prototype.awq`` (torchao 0.18): that one
keeps 1/s as an activation pre-scale inside the quantized weight, which only torchao's int4
tensor layouts carry and neither the MLX nor the XNNPACK lowering takes; folding s into the
preceding norm or linear leaves ordinary affine tensors and no extra op in the program.
Folding needs to know which op feeds which linear, so the architectures are named
(``FOLDS``); others are refused with the reason.
"""

from __future__ import annotations

import torch

from mlxbuild.calibration import feed
from mlxbuild.errors import BuildError

# The decoders whose layers are laid out as below (RMSNorm weights multiply, not 1 + w).
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
# (the op that makes the input: a norm or a linear, relative to a decoder layer; the linears
# that read it). v -> o only where v's outputs are o's inputs one to one (no grouped heads).
FOLDS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
)
GRID = 20  # alphas tried: 0, 1/20, ..., 19/20


def apply(model, chosen: dict[str, tuple[int, int | None]], calibration: torch.Tensor) -> dict[str, float]:
    """Scale and fold in place for every group with a linear in ``chosen`` ({name: (bits,
    group size or None for per channel)}); return each scaled linear's alpha."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in ARCHITECTURES:
        raise BuildError(f"method awq folds its scales into the layers of {', '.join(ARCHITECTURES)} "
                         f"models; this is a {kind or type(model).__name__} model (use method: gptq)")
    groups = []
    for i, layer in enumerate(model.model.layers):
        for prev, linears in FOLDS:
            names = [f"model.layers.{i}.{n}" for n in linears]
            if not any(n in chosen for n in names):
                continue
            src = layer.get_submodule(prev)
            first = model.get_submodule(names[0])
            if isinstance(src, torch.nn.Linear) and src.out_features != first.in_features:
                continue  # grouped heads: v's outputs are repeated into o's inputs
            groups.append((src, names))
    inputs = _inputs(model, [names[0] for _, names in groups], calibration)
    alphas = {}
    with torch.no_grad():
        for src, names in groups:
            x = inputs[names[0]]
            bits, group = next(chosen[n] for n in names if n in chosen)
            weights = [model.get_submodule(n).weight for n in names]
            alpha, s = _search(x, weights, bits, group)
            for n, w in zip(names, weights):
                w.copy_((w.float() * s).to(w.dtype))
                alphas[n] = alpha
            if isinstance(src, torch.nn.Linear):  # its output rows make the input channels
                src.weight.copy_((src.weight.float() / s[:, None]).to(src.weight.dtype))
                if src.bias is not None:
                    src.bias.copy_((src.bias.float() / s).to(src.bias.dtype))
            else:
                src.weight.copy_((src.weight.float() / s).to(src.weight.dtype))
    return alphas


def _inputs(model, names: list[str], calibration: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each named linear's inputs over the calibration tokens, [tokens, in_features], float32."""
    out: dict[str, list] = {n: [] for n in names}
    feed(model, names, calibration, lambda n, x: out[n].append(x))
    return {n: torch.cat(xs) for n, xs in out.items()}


def _search(x: torch.Tensor, weights: list[torch.Tensor], bits: int, group: int | None):
    """The alpha (and its scales) whose rounded, rescaled weights reproduce the group's float
    outputs on ``x`` best. Scales weigh the activations' mean magnitude against the weights'
    (s = mean|x|^alpha / mean|w|^(1 - alpha), as AutoAWQ's duo scaling); alpha 0 with s = 1
    (plain rounding) is tried too, so the search never does worse on the calibration inputs."""
    w = torch.cat([w.float() for w in weights])
    n, k = w.shape
    g = k if group is None else group
    ref = x @ w.T
    x_mean = x.abs().mean(dim=0).clamp(min=1e-6)
    blocks = w.abs().reshape(n, k // g, g)
    w_mean = (blocks / blocks.amax(dim=-1, keepdim=True).clamp(min=1e-12)).reshape(n, k).mean(dim=0).clamp(min=1e-6)
    ones = torch.ones_like(x_mean)
    best = (((x @ _round(w, bits, g).T - ref) ** 2).mean().item(), 0.0, ones)
    for i in range(GRID):
        alpha = i / GRID
        s = (x_mean.pow(alpha) / w_mean.pow(1 - alpha)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = ((x @ (_round(w * s, bits, g) / s).T - ref) ** 2).mean().item()
        if err < best[0]:
            best = (err, alpha, s)
    return best[1], best[2]


def _round(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """``w`` rounded as the scheme rounds it (torchao's HQQ scale-only grid, the one
    ``IntxWeightOnlyConfig(intx_choose_qparams_algorithm="hqq_scale_only")`` computes),
    dequantized."""
    from mlxbuild import hqq

    n, k = w.shape
    # The same grid as torchao's function, bit for bit, in cache-sized blocks (mlxbuild.hqq):
    # the search rounds every candidate scaling of every layer.
    qdata, scale = hqq.quantize(w, group, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (qdata.float().reshape(n, k // group, group) * scale.float().reshape(n, k // group, 1)).reshape(n, k)
