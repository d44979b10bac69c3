"""speech-to-text: audio features in, token ids out. The task kind is shared by model
families whose programs differ, each in its own module:

- ``whisper`` (encoder-decoder): ``encoder`` + ``text_decoder``, ExecuTorch's seq2seq ASR
  runner's methods; greedy transcription after the decoder start ids;
- ``parakeet`` (TDT transducer): ``encoder`` + ``decoder_step`` + ``joint``, ExecuTorch's
  transducer runner's methods; greedy token-and-duration decoding.

The family is chosen by the checkpoint's ``model_type`` when building, and by the
program's method names when running. A family module provides ``MODEL_TYPES``,
``METHODS``, ``export(model, params, flavour)``, ``constant_methods(params, speech_config)``,
``reference(model, params, out)``, ``verify(pte, reference_dir, tol, backend)``,
``features(program, args)``, ``transcribe(program, features, max_new_tokens, stop_at_eos)``
and ``describe(result)``.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlxbuild.task_kinds import parakeet, whisper

NAME = "speech-to-text"
FAMILIES = (whisper, parakeet)
# What every speech program has (the structural check asks for these; the family's own
# methods are checked by its verification).
METHODS = ("encoder",)

VERIFY_PROMPT = 4
VERIFY_DECODE_STEPS = 8


def verify_spec(max_context_length: int, max_prefill_chunk: int) -> dict:
    prompt = min(VERIFY_PROMPT, max_prefill_chunk)
    return {"prompt": prompt, "decode_steps": min(VERIFY_DECODE_STEPS, max_context_length - prompt),
            "seed": 0}


def family(model_type: str):
    from mlxbuild.errors import BuildError

    for fam in FAMILIES:
        if model_type in fam.MODEL_TYPES:
            return fam
    known = ", ".join(t for fam in FAMILIES for t in fam.MODEL_TYPES)
    raise BuildError(f"speech-to-text: model_type {model_type!r} is not supported (supported: {known})")


def family_of_program(method_names):
    names = set(method_names)
    for fam in FAMILIES:
        if set(fam.METHODS) <= names:
            return fam
    raise ValueError(f"no speech-to-text family has the methods {sorted(names)}")


def _quantized_model(params: dict, cache):
    from mlxbuild import llm
    from mlxbuild.stages import quantize

    model = llm.load_model(cache.read("weights", params["weights"]), params["dtype"])
    quantize.load_into(model, cache.read("quantize", params["quantized"]))
    return model


def export(params: dict, cache, flavour_name: str):
    import delegate
    from mlxbuild import progress

    # Registers the flavour's custom ops (and the MLX schema); encoders keep transformers'
    # own attention, a decoder's self-attention uses the flavour's cache.
    delegate.flavour(flavour_name).attention_implementation()
    progress.note("loading quantized model")
    model = _quantized_model(params, cache)
    programs, sc = family(model.config.model_type).export(model, params, flavour_name)
    return programs, {"speech_config": sc}


def constant_methods(params: dict, info: dict) -> dict:
    sc = info["speech_config"]
    return family(sc["model_type"]).constant_methods(params, sc)


def reference(params: dict, cache, out: Path) -> dict:
    model = _quantized_model(params, cache)
    return family(model.config.model_type).reference(model, params, out)


def verify(pte: Path, reference_dir: Path, tol: dict, backend=None) -> dict:
    model_type = json.loads((Path(reference_dir) / "reference.json").read_text())["model_type"]
    return family(model_type).verify(pte, reference_dir, tol, backend)


def transcribe(program, features, max_new_tokens: int = 64, stop_at_eos: bool = True) -> dict:
    return family_of_program(program.method_names).transcribe(program, features, max_new_tokens, stop_at_eos)


def prepare_inputs(program, args, tokenizer) -> None:
    args.features = family_of_program(program.method_names).features(program, args)


def run(program, args) -> dict:
    return transcribe(program, args.features, args.max_new_tokens, stop_at_eos=not args.no_eos)


def describe(result: dict) -> list[str]:
    return whisper.describe(result) if "prompt" in result else parakeet.describe(result)
