"""speech-to-text: audio features in, token ids out. The task kind is shared by model
families whose programs differ, each in its own module:

- ``whisper`` (encoder-decoder): ``encoder`` + ``text_decoder``, ExecuTorch's seq2seq ASR
  runner's methods; greedy transcription after the decoder start ids;
- ``parakeet`` (TDT transducer): ``encoder`` + ``decoder_step`` + ``joint``, ExecuTorch's
  transducer runner's methods; greedy token-and-duration decoding.

The family is chosen by the checkpoint's ``model_type`` when building, and by the
program's method names when running. A family module provides ``NAME`` (its name
in ``mlxbuild.families.ARCHITECTURES``), ``METHODS``, ``export(model, params, flavour)``,
``constant_methods(params, speech_config)``,
``reference(model, params, out)``, ``verify(program, reference_dir, info, tol)``,
``features(program, args)``, ``transcribe(program, features, max_new_tokens, stop_at_eos)``
and ``describe(result)``.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlxbuild.families import family_of, parakeet, whisper

NAME = "speech-to-text"
FAMILIES = (whisper, parakeet)
# What every speech program has (the structural check asks for these; the family's own
# methods are checked by its verification).
METHODS = ("encoder",)
# Encoders keep transformers' own attention; a decoder's self-attention uses the
# flavour's cache (its DecoderCache), installed by the family.
USES_FLAVOUR_ATTENTION = False

VERIFY_PROMPT = 4
VERIFY_DECODE_STEPS = 8


def verify_spec(max_context_length: int, max_prefill_chunk: int) -> dict:
    prompt = min(VERIFY_PROMPT, max_prefill_chunk)
    return {"prompt": prompt, "decode_steps": min(VERIFY_DECODE_STEPS, max_context_length - prompt),
            "seed": 0}


def family(model_type: str):
    return family_of(NAME, FAMILIES, model_type)


def family_of_program(method_names):
    names = set(method_names)
    for fam in FAMILIES:
        if set(fam.METHODS) <= names:
            return fam
    raise ValueError(f"no speech-to-text family has the methods {sorted(names)}")


def export(model, params: dict, flavour):
    programs, sc = family(model.config.model_type).export(model, params, flavour)
    return programs, {"speech_config": sc}


def constant_methods(params: dict, info: dict) -> dict:
    sc = info["speech_config"]
    return family(sc["model_type"]).constant_methods(params, sc)


def reference(model, params: dict, out: Path) -> dict:
    return family(model.config.model_type).reference(model, params, out)


def verify(program, reference_dir: Path, info: dict, tol: dict) -> dict:
    return family(info["model_type"]).verify(program, reference_dir, info, tol)


def transcribe(program, features, max_new_tokens: int = 64, stop_at_eos: bool = True) -> dict:
    return family_of_program(program.method_names).transcribe(program, features, max_new_tokens, stop_at_eos)


def prepare_inputs(program, args, tokenizer) -> None:
    args.features = family_of_program(program.method_names).features(program, args)


def run(program, args) -> dict:
    return transcribe(program, args.features, args.max_new_tokens, stop_at_eos=not args.no_eos)


def describe(result: dict) -> list[str]:
    return whisper.describe(result) if "prompt" in result else parakeet.describe(result)
