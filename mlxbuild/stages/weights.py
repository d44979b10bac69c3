"""Materialize weights in the manifest's dtype as one Hugging Face folder."""

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
        from mlxbuild.families.hf import auto_model_class

        model = auto_model_class(load["path"]).from_pretrained(load["path"], dtype=dtype)
        model.save_pretrained(out)
        _copy_tokenizer(Path(load["path"]), out)
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
    return model.to(dtype).eval()


def _copy_tokenizer(src: Path, out: Path) -> None:
    import shutil

    # preprocessor_config.json: a speech model's feature extractor (log-mel settings).
    for p in list(src.glob("tokenizer*")) + list(src.glob("*.model")) + list(src.glob("preprocessor_config.json")):
        if p.is_file():
            shutil.copy2(p, out / p.name)
