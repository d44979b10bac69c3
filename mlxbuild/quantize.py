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
    # A tied output projection under the same rule as the embedding ends up sharing the
    # embedding's quantized tensor; quantizing it separately first (as ExecuTorch's
    # export does) would spend the largest matrix's HQQ time to be thrown away.
    retie = tied and _active(scheme.get("linear")) and scheme.get("linear") == scheme.get("embedding")
    skip = {tied[0]} if retie else set()
    layers: dict[str, dict] = {}
    for kind, cls in (("embedding", torch.nn.Embedding), ("linear", torch.nn.Linear)):
        rule = scheme.get(kind)
        names = [n for n, m in model.named_modules() if isinstance(m, cls)]
        if not _active(rule):
            layers.update({n: {"format": "none"} for n in names})
            continue
        wanted = {n for n, m in model.named_modules()
                  if isinstance(m, cls) and n not in skip and _fits(m, rule)}
        quantize_(model, _config(rule, kind), filter_fn=lambda m, fqn, w=wanted: fqn in w)
        layers.update({n: (_describe(rule) if n in wanted else {"format": "none", "reason": "shape"})
                       for n in names if n not in skip})
    if retie:
        out_name, emb_name = tied
        out, emb = model.get_submodule(out_name), model.get_submodule(emb_name)
        out.weight = emb.weight
        layers[out_name] = {**layers[emb_name], "tied_to": emb_name}
    return layers


def _fits(module, rule) -> bool:
    group = rule.get("group_size", 32)
    if rule.get("format") == "nvfp4":
        return all(d % 16 == 0 for d in module.weight.shape)
    return group == "per_channel" or module.weight.shape[-1] % int(group) == 0


def _tied(model):
    """(output module name, input embedding name) when they share one weight."""
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    if not (get_out and get_in):
        return None
    out, emb = get_out(), get_in()
    if out is None or emb is None or out.weight is not emb.weight:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    return names[id(out)], names[id(emb)]
