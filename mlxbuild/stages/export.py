"""torch.export one (scheme, flavour) and save it: every lowering starts from this file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import delegate
from mlxbuild import llm, progress
from mlxbuild.stages import quantize


def build_exportable(params: dict, cache, flavour_name: str):
    flavour = delegate.flavour(flavour_name)
    attn = flavour.attention_implementation()
    model = llm.load_model(cache.path("weights", params["weights"]), params["dtype"], attn)
    quantize.load_into(model, cache.path("quantize", params["quantized"]))
    exportable = llm.make_exportable(model, params["max_context_length"])
    if llm.is_hf(model):
        flavour.install_cache(exportable, model.config, params["max_context_length"],
                              params["max_prefill_chunk"], llm.DTYPES[params["dtype"]])
    return model, exportable.eval()


def run(params: dict, cache, out: Path) -> dict:
    progress.note("loading quantized model")
    model, exportable = build_exportable(params, cache, params["flavour"])
    kwargs, dynamic = llm.example_inputs(params["max_prefill_chunk"])
    progress.note("torch.export")
    with torch.no_grad():
        program = torch.export.export(exportable, (), kwargs, dynamic_shapes=dynamic, strict=True)
    torch.export.save(program, out / "program.pt2")
    info = {"flavour": params["flavour"], "text_config": llm.text_config(model),
            "graph_nodes": len(program.graph.nodes)}
    (out / "export.json").write_text(json.dumps(info, indent=1))
    return info


def load_program(entry: Path, flavour_name: str):
    """Reload a saved program; the flavour's custom ops must be registered first."""
    import torchao  # noqa: F401

    delegate.flavour(flavour_name).attention_implementation()
    return torch.export.load(entry / "program.pt2")
