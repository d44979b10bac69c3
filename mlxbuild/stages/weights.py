"""The weights as one Hugging Face folder: a local (or hub-cached) checkpoint's own files,
hard-linked into the entry (copied across filesystems) rather than loaded and saved again, so
no step holds a model to make it and the disk holds it once; the steps that load it convert
to the dtype they build in. Synthetic weights and module sources are materialized in the
manifest's dtype."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mlxbuild.families.hf import DTYPES, build_module
from mlxbuild.steps import WeightsParams



def run(params: WeightsParams, cache, out: Path) -> dict:
    load, dtype = params.load, DTYPES[params.dtype]
    if "synthetic" in load:
        model = _synthetic(load["synthetic"], dtype)
        model.save_pretrained(out)
    elif "path" in load:
        count = _reference_checkpoint(Path(load["path"]), out)
        (out / "source.json").write_text(json.dumps({"load": load, "dtype": params.dtype}))
        return {"parameters": count}
    elif "module" in load:
        from safetensors.torch import save_model

        torch.manual_seed(0)
        model = build_module(load).to(dtype)
        save_model(model, str(out / "model.safetensors"))
    (out / "source.json").write_text(json.dumps({"load": load, "dtype": params.dtype}))
    return {"parameters": sum(p.numel() for p in model.parameters())}


def _synthetic(recipe: dict, dtype):
    import transformers
    from transformers import AutoConfig

    from mlxbuild.families import auto_class_name, model_type_of

    config = AutoConfig.for_model(model_type_of(recipe["architecture"]), **recipe["config"])
    torch.manual_seed(recipe["seed"])
    auto = getattr(transformers, auto_class_name(config.model_type))
    model = auto.from_config(config, dtype=torch.float32)
    if recipe.get("outliers"):
        _outliers(model, config.hidden_size, recipe["outliers"], recipe["seed"])
    return model.to(dtype).eval()


def _outliers(model, hidden: int, spec: dict, seed: int) -> None:
    """Multiply the same seeded hidden channels of every hidden-sized RMSNorm weight."""
    channels = torch.randperm(hidden, generator=torch.Generator().manual_seed(seed + 1))[:spec["channels"]]
    with torch.no_grad():
        for module in model.modules():
            w = getattr(module, "weight", None)
            if type(module).__name__.endswith("RMSNorm") and w is not None and tuple(w.shape) == (hidden,):
                w[channels] *= spec["scale"]


# What a Hugging Face folder's model is read from (the checkpoint check has vouched for them),
# and the tokenizer and processor files beside it (preprocessor_config.json: a speech model's
# feature extractor).
_MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer*", "*.model", "special_tokens_map.json", "preprocessor_config.json")


def _reference_checkpoint(src: Path, out: Path) -> int:
    """Link the checkpoint's files into ``out``; return its parameter count (from the
    safetensors headers, nothing loaded)."""
    from safetensors import safe_open

    names = sorted({p.name for pattern in _MODEL_FILES + _TOKENIZER_FILES for p in src.glob(pattern) if p.is_file()})
    for name in names:
        _link(src / name, out / name)
    count = 0
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                count += n
    return count


def _link(src: Path, dst: Path) -> None:
    """A hard link (the cache entry and the checkpoint share the bytes; the entry's inventory
    catches an edit made through either name), else a copy (another filesystem)."""
    import os
    import shutil

    src = src.resolve()  # a hub snapshot's files are relative symlinks into its blob store
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
