"""A manifest quantization scheme applied to a model with torchao, in place.

Linear and embedding layers get their own rule; the torchao configs are the
ones ExecuTorch's backends consume (IntxWeightOnly for weight-only affine,
Int8DynamicActivationIntxWeight for XNNPACK's 8da schemes, ExecuTorch's
exportable NVFP4). HQQ scale-only parameter choice is what ExecuTorch's own LLM
export uses; it lowers error at equal cost in the artifact.
"""

from __future__ import annotations

import torch


def _granularity(group_size):
    from torchao.quantization.granularity import PerAxis, PerGroup

    return PerAxis(0) if group_size == "per_channel" else PerGroup(int(group_size))


def _config(rule: dict, layer: str):
    from torchao.quantization.quant_api import (
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
    )

    fmt = rule.get("format", "affine")
    if fmt == "nvfp4":
        from executorch.extension.llm.export.nvfp4 import ExportableNVFP4Config

        return ExportableNVFP4Config(use_per_tensor_scale=False)
    bits = rule["bits"]
    weight_dtype = getattr(torch, f"int{bits}")
    granularity = _granularity(rule.get("group_size", 32))
    if rule.get("activations") == "int8_dynamic":
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=weight_dtype, weight_granularity=granularity,
            intx_choose_qparams_algorithm="hqq_scale_only")
    return IntxWeightOnlyConfig(weight_dtype=weight_dtype, granularity=granularity,
                                intx_choose_qparams_algorithm="hqq_scale_only")


def _active(rule) -> bool:
    return bool(rule) and rule.get("format", "affine") != "none"


def _describe(rule: dict) -> dict:
    if rule.get("format", "affine") == "nvfp4":
        return {"format": "nvfp4", "group_size": 16}
    return {"format": "affine", "bits": rule["bits"], "group_size": rule.get("group_size", 32),
            "activations": rule.get("activations", "none")}


def apply_scheme(model: torch.nn.Module, scheme: dict) -> dict[str, dict]:
    """Quantize in place; return {module name: its final quantization}."""
    from torchao.quantization.quant_api import quantize_

    tied = _tied(model)
    layers: dict[str, dict] = {}
    for kind, cls in (("embedding", torch.nn.Embedding), ("linear", torch.nn.Linear)):
        rule = scheme.get(kind)
        names = [n for n, m in model.named_modules() if isinstance(m, cls)]
        if not _active(rule):
            layers.update({n: {"format": "none"} for n in names})
            continue
        wanted = {n for n, m in model.named_modules() if isinstance(m, cls) and _fits(m, rule)}
        quantize_(model, _config(rule, kind), filter_fn=lambda m, fqn, w=wanted: fqn in w)
        layers.update({n: (_describe(rule) if n in wanted else {"format": "none", "reason": "shape"})
                       for n in names})
    if tied and scheme.get("linear") == scheme.get("embedding"):
        # Both sides hold identical quantized data: share it again so the artifact stores it once.
        out, emb = tied
        out.weight = emb.weight
    return layers


def _fits(module, rule) -> bool:
    group = rule.get("group_size", 32)
    if rule.get("format") == "nvfp4":
        return all(d % 16 == 0 for d in module.weight.shape)
    return group == "per_channel" or module.weight.shape[-1] % int(group) == 0


def _tied(model):
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    if not (get_out and get_in):
        return None
    out, emb = get_out(), get_in()
    if out is not None and emb is not None and out.weight is emb.weight:
        return out, emb
    return None
