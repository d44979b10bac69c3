"""A manifest quantization scheme applied to a model with torchao, in place.

Every linear and embedding module gets one effective rule: the first of the
scheme's per-layer ``rules`` whose selectors all pick it, else the scheme's
``linear`` / ``embedding`` rule. Modules sharing a rule are quantized in one
torchao pass. The torchao configs are the ones ExecuTorch's backends consume
(IntxWeightOnly for weight-only affine, Int8DynamicActivationIntxWeight for
XNNPACK's 8da schemes, ExecuTorch's exportable NVFP4). HQQ scale-only parameter
choice is what ExecuTorch's own LLM export uses; it lowers error at equal cost
in the artifact.

A rule that picks no module, or only modules an earlier rule already took, does
nothing; that is always a mistake in the manifest, so it fails the build.
"""

from __future__ import annotations

import fnmatch
import json
import re

import torch

from mlxbuild.errors import BuildError

KINDS = {"embedding": torch.nn.Embedding, "linear": torch.nn.Linear}
DEFAULT_GROUP_SIZE = 32
NVFP4_GROUP_SIZE = 16
NONE = {"format": "none"}


# --------------------------------------------------------------------------- rules


def _quant(rule: dict | None) -> dict:
    """The quantization part of a rule, normalised so equal rules compare equal."""
    if not rule or rule.get("format", "affine") == "none":
        return dict(NONE)
    if rule.get("format") == "nvfp4":
        return {"format": "nvfp4", "group_size": NVFP4_GROUP_SIZE}
    if rule.get("format") == "cuda_int4":
        return {"format": "cuda_int4", "bits": 4, "group_size": rule.get("group_size") or DEFAULT_GROUP_SIZE}
    return {"format": "affine", "bits": int(rule["bits"]),
            "group_size": rule.get("group_size") or DEFAULT_GROUP_SIZE,
            "activations": rule.get("activations") or "none"}


def rule_kinds(rule: dict) -> tuple[str, ...]:
    """Layer kinds a per-layer rule can pick (activation quantization exists for linear only)."""
    if rule.get("layers"):
        return (rule["layers"],)
    return ("linear",) if rule.get("activations") == "int8_dynamic" else ("linear", "embedding")


def describe_rule(index: int, rule: dict) -> str:
    """``rules[1] (blocks [0, -1])``: how errors and the record name a rule."""
    sel = []
    for key in ("match", "regex", "blocks", "layers"):
        if rule.get(key) is not None:
            value = rule[key]
            sel.append(f"{key} {value!r}" if isinstance(value, str) else f"{key} {value}")
    return f"rules[{index}] ({', '.join(sel)})"


def decoder_blocks(model: torch.nn.Module) -> tuple[str | None, int]:
    """(module name of the decoder-block list, number of blocks).

    The list whose length is the config's ``num_hidden_layers`` when the model has a
    config; otherwise the longest ``ModuleList`` (a user's own module).
    """
    lists = [(n, len(m)) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and n]
    if not lists:
        return None, 0
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    want = getattr(config, "num_hidden_layers", None)
    for name, n in lists:
        if n == want:
            return name, n
    return max(lists, key=lambda x: x[1])


def _block_of(name: str, container: str | None) -> int | None:
    if container is None or not name.startswith(container + "."):
        return None
    head = name[len(container) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _resolve_blocks(index: int, rule: dict, n_blocks: int, container: str | None) -> set[int]:
    if container is None:
        raise BuildError(f"quantization {describe_rule(index, rule)}: the model has no list of "
                         "decoder blocks to select from; use match or regex on module names")
    out = set()
    for b in rule["blocks"]:
        k = b + n_blocks if b < 0 else b
        if not 0 <= k < n_blocks:
            raise BuildError(f"quantization {describe_rule(index, rule)}: block {b} is out of range; "
                             f"the model has {n_blocks} decoder blocks ({container}.0 to "
                             f"{container}.{n_blocks - 1}; -{n_blocks} to -1 from the end)")
        out.add(k)
    return out


def _selector(index: int, rule: dict, n_blocks: int, container: str | None):
    """A predicate (name, kind) -> bool for one rule: all of its selectors must hold."""
    kinds = rule_kinds(rule)
    glob = rule.get("match")
    regex = re.compile(rule["regex"]) if rule.get("regex") else None
    blocks = _resolve_blocks(index, rule, n_blocks, container) if rule.get("blocks") else None

    def picks(name: str, kind: str) -> bool:
        return (kind in kinds
                and (glob is None or fnmatch.fnmatchcase(name, glob))
                and (regex is None or regex.fullmatch(name) is not None)
                and (blocks is None or _block_of(name, container) in blocks))

    return picks


def assign_rules(model: torch.nn.Module, scheme: dict) -> dict[str, tuple[str, str, dict]]:
    """{module name: (kind, which rule, quantization)} for every linear and embedding module.

    "which rule" is ``rules[i]`` or the base ``linear`` / ``embedding``. Raises
    BuildError for a rule that picks nothing or only what earlier rules took.
    """
    rules = scheme.get("rules") or []
    container, n_blocks = decoder_blocks(model)
    selectors = [_selector(i, r, n_blocks, container) for i, r in enumerate(rules)]
    picked: list[list[str]] = [[] for _ in rules]
    owner: dict[str, int] = {}
    out: dict[str, tuple[str, str, dict]] = {}
    for name, module in model.named_modules():
        kind = next((k for k, cls in KINDS.items() if isinstance(module, cls)), None)
        if kind is None:
            continue
        winner = None
        for i, picks in enumerate(selectors):
            if picks(name, kind):
                picked[i].append(name)
                if winner is None:
                    winner = i
        if winner is None:
            out[name] = (kind, kind, _quant(scheme.get(kind)))
        else:
            owner[name] = winner
            out[name] = (kind, f"rules[{winner}]", _quant(rules[winner]))
    for i, names in enumerate(picked):
        if not names:
            raise BuildError(f"quantization {describe_rule(i, rules[i])} matches no layer of the model "
                             f"(linear and embedding modules: {_sample(out)})")
        if all(owner[n] != i for n in names):
            earlier = sorted({owner[n] for n in names})
            raise BuildError(
                f"quantization {describe_rule(i, rules[i])} only matches layers that earlier rules "
                f"already set ({', '.join(f'rules[{e}]' for e in earlier)}); the first matching rule "
                "wins, so this one does nothing")
    return out


def _sample(layers: dict, n: int = 6) -> str:
    names = list(layers)
    more = f", ... ({len(names)} in all)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


# --------------------------------------------------------------------------- torchao


def _granularity(group_size):
    from torchao.quantization.granularity import PerAxis, PerGroup

    return PerAxis(0) if group_size == "per_channel" else PerGroup(int(group_size))


def _config(q: dict):
    from torchao.quantization.quant_api import (
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
    )

    if q["format"] == "nvfp4":
        from executorch.extension.llm.export.nvfp4 import ExportableNVFP4Config

        return ExportableNVFP4Config(use_per_tensor_scale=False)
    if q["format"] == "cuda_int4":
        from torchao.quantization.quant_api import Int4WeightOnlyConfig

        # As ExecuTorch's CUDA exports quantize (extension/llm/export/quantize.py): the layout
        # its runtime's _weight_int4pack_mm takes, HQQ parameters.
        return Int4WeightOnlyConfig(group_size=int(q["group_size"]), int4_packing_format="tile_packed_to_4d",
                                    int4_choose_qparams_algorithm="hqq")
    weight_dtype = getattr(torch, f"int{q['bits']}")
    granularity = _granularity(q["group_size"])
    if q["activations"] == "int8_dynamic":
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=weight_dtype, weight_granularity=granularity,
            intx_choose_qparams_algorithm="hqq_scale_only")
    return IntxWeightOnlyConfig(weight_dtype=weight_dtype, granularity=granularity,
                                intx_choose_qparams_algorithm="hqq_scale_only")


def _fits(module, q: dict) -> bool:
    if q["format"] == "nvfp4":
        return all(d % NVFP4_GROUP_SIZE == 0 for d in module.weight.shape)
    return q["group_size"] == "per_channel" or module.weight.shape[-1] % int(q["group_size"]) == 0


def apply_scheme(model: torch.nn.Module, scheme: dict, calibration: torch.Tensor | None = None,
                 only: set[str] | None = None, pieces=None) -> dict[str, dict]:
    """Quantize in place; return {module name: its final quantization}. A scheme with
    ``method: gptq`` or ``awq`` takes ``calibration`` token ids [samples, seq_len]: its affine
    linears get GPTQ's codes (``mlxbuild.gptq``) or are rounded after AWQ's scales are folded
    in (``mlxbuild.awq``); the rest is rounded as usual.

    Each entry has ``format`` (and ``bits`` / ``group_size`` / ``activations`` when
    quantized), ``rule`` (which rule set it), and for a tied output projection
    ``tied_to`` (it shares the embedding's quantized tensor) or ``untied_from``
    (its rule differs from the embedding's, so it keeps its own copy).

    With ``only``, the layers outside it stay as they are (what one rule costs on its own).

    With ``pieces`` (``mlxbuild.families.streaming.pieces``), the model starts on the meta
    device and each iteration materializes a piece and yields its module names; each piece
    is quantized as it arrives, so only one piece is ever in float. Rules, ties and the
    result are decided on the whole layout first, as without it. Calibrated methods and
    cuda_int4 need the whole float model and take no pieces.
    """

    assigned = assign_rules(model, scheme)
    if only is not None:
        assigned = {n: (k, r, q if n in only else dict(NONE)) for n, (k, r, q) in assigned.items()}
    layers: dict[str, dict] = {}
    groups: dict[str, list[str]] = {}
    for name, (_kind, rule, q) in assigned.items():
        module = model.get_submodule(name)
        if q["format"] != "none" and not _fits(module, q):
            layers[name] = {"format": "none", "reason": "shape", "rule": rule}
            continue
        layers[name] = {**q, "rule": rule}
        if q["format"] != "none":
            groups.setdefault(json.dumps(q, sort_keys=True), []).append(name)

    tied = _tied(model)
    retie = False
    if tied:
        out_name, emb_name = tied
        same = {k: v for k, v in layers[out_name].items() if k != "rule"} == \
            {k: v for k, v in layers[emb_name].items() if k != "rule"}
        if same and layers[emb_name]["format"] != "none":
            # The output projection will share the embedding's quantized tensor: quantizing it
            # separately first (as ExecuTorch's export does) would spend the largest matrix's
            # HQQ time to be thrown away.
            retie = True
            for names in groups.values():
                if out_name in names:
                    names.remove(out_name)
        elif not same:
            layers[out_name]["untied_from"] = emb_name

    floats, hs = {}, {}
    method = scheme.get("method") or "rtn"
    if pieces is not None and (method != "rtn" or any(json.loads(k)["format"] == "cuda_int4" for k in groups)):
        raise BuildError(f"{method if method != 'rtn' else 'cuda_int4'} quantizes the whole float model: "
                         "it cannot be streamed")
    if method in ("gptq", "awq"):
        import importlib

        chosen = [n for key, names in groups.items() if json.loads(key)["format"] == "affine"
                  for n in names if assigned[n][0] == "linear"]
        if calibration is None:
            raise BuildError(f"method {method} needs calibration tokens")
        # Imported by name, as mlxbuild.stages.quantize imports the calibration text: their
        # code is in the keys of calibrated schemes only (mlxbuild.plan.step_code).
        if method == "awq":
            awq = importlib.import_module("mlxbuild.awq")
            widths = {n: (int(layers[n]["bits"]),
                          None if layers[n]["group_size"] == "per_channel" else int(layers[n]["group_size"]))
                      for n in chosen}
            alphas = awq.apply(model, widths, calibration)
            for n in chosen:
                if n in alphas:
                    layers[n].update(method="awq", awq_alpha=alphas[n])
        else:
            gptq = importlib.import_module("mlxbuild.gptq")
            # Every layer's inputs from the float model, before any layer is quantized.
            hs = gptq.hessians(model, chosen, calibration)
            floats = {n: model.get_submodule(n).weight.detach() for n in chosen}
            for n in chosen:
                layers[n]["method"] = "gptq"

    if pieces is not None and not any(groups.values()):
        pieces = []  # nothing to quantize: nothing to read (the record is the layout's)
    for here in (pieces if pieces is not None else [None]):
        for key, all_names in groups.items():
            names = [n for n in all_names if here is None or n in here]
            if names:
                _quantize_group(model, json.loads(key), names, floats, hs)

    if tied:
        out_name, emb_name = tied
        out, emb = model.get_submodule(out_name), model.get_submodule(emb_name)
        if retie:
            out.weight = emb.weight
            layers[out_name] = {**layers[emb_name], "rule": layers[out_name]["rule"],
                                "tied_to": emb_name}
        elif "untied_from" in layers[out_name]:
            # The rules differ, so at least one side was quantized and torchao gave it a new
            # Parameter, which parts the two; should that ever not hold, copy rather than
            # let one rule's tensor silently serve both.
            if out.weight is emb.weight:
                out.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        elif layers[out_name]["format"] == "none":
            layers[out_name]["tied_to"] = emb_name
    return layers


def _quantize_group(model, q: dict, names: list[str], floats: dict, hs: dict) -> None:
    """Quantize the modules ``names`` with one rule's quantization ``q``."""
    from torchao.quantization.quant_api import quantize_

    from mlxbuild import hqq

    half = _nvfp4_from_float32(model, names) if q["format"] == "nvfp4" else {}
    config = _config(q)
    if q["format"] == "cuda_int4":
        _quantize_on_gpu(model, names, config)
        return
    # HQQ in cache-sized row blocks, to torchao's bytes: faster, and no fp32 copy of a whole matrix.
    blocked = {n for n in names if hqq.applies(model.get_submodule(n), config)}
    for name in blocked:
        hqq.quantize_module(model.get_submodule(name), config)
    wanted = set(names) - blocked
    if wanted:
        quantize_(model, config, filter_fn=lambda m, fqn: fqn in wanted)
    for name in names:
        if name in floats:
            import importlib

            importlib.import_module("mlxbuild.gptq").apply(model.get_submodule(name), floats.pop(name),
                                                           hs.pop(name))
    for name, dtype in half.items():
        module = model.get_submodule(name)
        # Back to the model's dtype without dequantizing: only the output dtype changes.
        module.weight = torch.nn.Parameter(module.weight.to(dtype=dtype), requires_grad=False)


def _quantize_on_gpu(model, names: list[str], config) -> None:
    """cuda_int4: torch packs the tinygemm layout with a CUDA kernel only, so each module is
    quantized on the GPU and its packed weight comes back to the host (the bytes are the
    GPU's layout: export traces them, the CUDA lowering moves them back)."""
    from torchao.quantization.quant_api import quantize_

    if not torch.cuda.is_available():
        raise BuildError("cuda_int4 packs weights with a CUDA kernel: quantize on a host with a CUDA GPU")
    for name in names:
        module = model.get_submodule(name)
        if module.weight.dtype != torch.bfloat16:
            raise BuildError(f"{name}: cuda_int4 needs bf16 weights, got {module.weight.dtype}")
        # New Parameters, not module.to(): that moves a Parameter in place, and a tied output
        # projection shares its Parameter with the embedding, which must stay on the host.
        for attr in ("weight", "bias"):
            if getattr(module, attr, None) is not None:
                setattr(module, attr, torch.nn.Parameter(getattr(module, attr).detach().to("cuda"),
                                                         requires_grad=False))
    wanted = set(names)
    quantize_(model, config, filter_fn=lambda m, fqn: fqn in wanted)
    for name in names:
        model.get_submodule(name).to("cpu")


def device_for(model):
    """Where a model with GPU-only weights (cuda_int4) runs and is traced: the whole model is
    moved to the GPU and the returned context makes the tensors created under it (inputs,
    static caches) there too; any other model stays on the host as it is."""
    import contextlib

    if not needs_gpu(model):
        return contextlib.nullcontext()
    model.to("cuda")
    return torch.device("cuda")


def needs_gpu(model) -> bool:
    """Whether the model holds weights only a CUDA kernel computes with (cuda_int4)."""
    try:
        from torchao.quantization import Int4TilePackedTo4dTensor
    except ImportError:
        return False
    return any(isinstance(p, Int4TilePackedTo4dTensor) for p in model.parameters())


def _nvfp4_from_float32(model, names: list[str]) -> dict[str, torch.dtype]:
    """torchao's NVFP4 quantizer takes float32 and bfloat16 only; fp16 weights go through
    float32 (exact: every fp16 value is a float32 value). Returns the names converted."""
    converted = {}
    for name in names:
        module = model.get_submodule(name)
        if module.weight.dtype == torch.float16:
            converted[name] = module.weight.dtype
            module.weight = torch.nn.Parameter(module.weight.detach().float(), requires_grad=False)
    return converted


def summarize(layers: dict[str, dict]) -> dict:
    """Counts per format/bits (``affine-4``, ``nvfp4``, ``none``) and the tie status."""
    counts: dict[str, int] = {}
    for info in layers.values():
        key = f"affine-{info['bits']}" if info["format"] == "affine" else info["format"]
        if info.get("activations", "none") != "none":
            key += f"-{info['activations']}"
        counts[key] = counts.get(key, 0) + 1
    summary = {"layers": len(layers), "counts": dict(sorted(counts.items()))}
    for name, info in layers.items():
        if "tied_to" in info:
            summary["tied"] = {name: info["tied_to"]}
        if "untied_from" in info:
            summary["untied"] = {name: info["untied_from"]}
    return summary


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
