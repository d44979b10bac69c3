"""Quantize the materialized weights with one scheme; keep the quantized state dict.

The state dict holds torchao tensor subclasses; export and the reference both
reload it with ``load_state_dict(assign=True)``, so the same quantized tensors
(and the same per-layer rules) reach every flavour and the verification reference.
Besides ``state.pt`` the entry holds ``layers.json`` (each module's final
quantization) and ``summary.json`` (counts per format/bits), which the package
step copies into the artifact's record.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from mlxbuild import progress
from mlxbuild.errors import BuildError
from mlxbuild.families import streaming
from mlxbuild.families.hf import load_model
from mlxbuild.quantize import apply_scheme, summarize
from mlxbuild.steps import QuantizeParams, streams


def run(params: QuantizeParams, cache, out: Path) -> dict:
    weights = cache.read("weights", params.weights)
    # Round-to-nearest needs one layer at a time: the model is laid out on the meta device
    # and each piece is read, quantized and kept quantized (mlxbuild.families.streaming).
    # GPTQ/AWQ run the float model on calibration tokens, cuda_int4 packs on the GPU: those
    # load it whole, as does a checkpoint streaming can't reproduce from_pretrained for.
    streamed = streaming.layout(weights, params.dtype) if streams(params.scheme) else None
    if streamed is not None:
        model, checkpoint = streamed
        progress.note("quantizing layer by layer")
        with torch.no_grad():
            try:
                layers = apply_scheme(model, params.scheme, pieces=streaming.pieces(model, checkpoint))
            except BuildError as e:
                raise BuildError(f"{params.label or 'quantize'}: {e}") from None
        return _finish(model, layers, out)
    model = load_model(weights, params.dtype)
    calibration = None
    if params.calibration is not None:
        from mlxbuild.families.hf import text_config

        # Imported by name: only GPTQ schemes run it, and only their keys hash it
        # (mlxbuild.plan.step_code), so an edit of the tokenizer code leaves RTN schemes be.
        evaluation = importlib.import_module("mlxbuild.evaluation")

        tok = cache.read("tokenizer", params.tokenizer) if params.tokenizer else None
        ids, _ = evaluation.tokens(params.calibration, tok, text_config(model).get("vocab_size") or 2)
        calibration = torch.from_numpy(ids)
        progress.note(f"calibrating on {ids.shape[0]} x {ids.shape[1]} tokens")
    progress.note("quantizing")
    with torch.no_grad():
        try:
            layers = apply_scheme(model, params.scheme, calibration)
        except BuildError as e:
            raise BuildError(f"{params.label or 'quantize'}: {e}") from None
    return _finish(model, layers, out)


def _finish(model, layers: dict, out: Path) -> dict:
    save(model, layers, out)
    summary = summarize(layers)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def save(model, layers: dict, out: Path) -> None:
    """The quantized state (what :func:`load_into` reads back) and each layer's quantization."""
    if any(layer["format"] != "none" for layer in layers.values()):
        # A tied output projection is stored once, as the embedding: load_into re-ties it.
        tied = {f"{name}.weight" for name, info in layers.items() if "tied_to" in info}
        state = {k: v for k, v in model.state_dict().items() if k not in tied}
        torch.save(state, out / "state.pt")
    # else: the materialized weights are the model; a second full copy would only cost disk.
    (out / "layers.json").write_text(json.dumps(layers, indent=1))


def load_into(model, entry: Path) -> None:
    import torchao  # noqa: F401  (registers the tensor subclasses torch.load rebuilds)

    if not (entry / "state.pt").exists():
        return  # unquantized scheme
    state = torch.load(entry / "state.pt", weights_only=False, mmap=True)
    model.load_state_dict(state, assign=True, strict=False)
    # Pickling gives each tensor-subclass wrapper its own object even where two names shared
    # one, so ties are restored by name; export then sees a single parameter.
    layers = json.loads((entry / "layers.json").read_text())
    for name, info in layers.items():
        if "tied_to" in info:
            model.get_submodule(name).weight = model.get_submodule(info["tied_to"]).weight
    # assign=True keeps the old parameters' requires_grad; integer tensor
    # subclasses can't carry gradients, and export decomposition unwraps them.
    for p in model.parameters():
        p.requires_grad_(False)


def quantized_model(cache, params, attn_implementation: str | None = None):
    """The model of ``params.weights`` with ``params.quantized``'s state loaded into it:
    what export and the reference start from. A quantized state holds every tensor the
    checkpoint does (the float ones too), so where streaming applies the model is laid out
    on the meta device and the state is assigned into it: the float model is never read."""
    weights, entry = cache.read("weights", params.weights), cache.read("quantize", params.quantized)
    streamed = streaming.layout(weights, params.dtype, attn_implementation) \
        if (entry / "state.pt").exists() else None
    if streamed is None:
        model = load_model(weights, params.dtype, attn_implementation)
        load_into(model, entry)
        return model
    model, checkpoint = streamed
    load_into(model, entry)
    streaming.materialize(model, checkpoint)  # whatever the state lacks (nothing, today)
    return model
