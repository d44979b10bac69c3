"""Quantize the materialized weights with one scheme; keep the quantized state dict.

The state dict holds torchao tensor subclasses; export and the reference both
reload it with ``load_state_dict(assign=True)``, so the same quantized tensors
(and the same per-layer rules) reach every flavour and the verification reference.
Besides ``state.pt`` the entry holds ``layers.json`` (each module's final
quantization) and ``summary.json`` (counts per format/bits), which the package
step copies into the artifact's record.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mlxbuild import progress
from mlxbuild.errors import BuildError
from mlxbuild.llm import load_model
from mlxbuild.quantize import apply_scheme, summarize


def run(params: dict, cache, out: Path) -> dict:
    model = load_model(cache.path("weights", params["weights"]), params["dtype"])
    progress.note("quantizing")
    with torch.no_grad():
        try:
            layers = apply_scheme(model, params["scheme"])
        except BuildError as e:
            raise BuildError(f"{params.get('label', 'quantize')}: {e}") from None
    if any(layer["format"] != "none" for layer in layers.values()):
        torch.save(model.state_dict(), out / "state.pt")
    # else: the materialized weights are the model; a second full copy would only cost disk.
    (out / "layers.json").write_text(json.dumps(layers, indent=1))
    summary = summarize(layers)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def load_into(model, entry: Path) -> None:
    import torchao  # noqa: F401  (registers the tensor subclasses torch.load rebuilds)

    if not (entry / "state.pt").exists():
        return  # unquantized scheme
    state = torch.load(entry / "state.pt", weights_only=False, mmap=True)
    model.load_state_dict(state, assign=True, strict=False)
    # assign=True keeps the old parameters' requires_grad; integer tensor
    # subclasses can't carry gradients, and export decomposition unwraps them.
    for p in model.parameters():
        p.requires_grad_(False)
