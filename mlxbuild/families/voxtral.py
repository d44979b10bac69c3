"""Voxtral (transformers' ``voxtral``): a Whisper-style audio encoder whose frames, four at a
time, a projector turns into decoder embeddings; a Llama decoder. The
``multimodal-text-to-text`` task kind's audio family (``mlxbuild.families.multimodal``):

- ``audio_encoder(input_features[1, n_mels, frames]) -> embeds[1, T, D]``: one Whisper
  window (3000 frames, 30 s, in the real model) through the encoder and the projector; T is
  the encoder's positions over four;
- ``token_embedding`` and ``text_decoder`` (``mlxbuild.families.embeds``).

In transformers the audio embeddings replace ``audio_token_id`` placeholders of the prompt;
ExecuTorch's runner prefills them as a segment of their own, between text segments, which
puts the same embeddings at the same positions.
"""

from __future__ import annotations

NAME = "voxtral"
MODALITY = "audio"
ENCODER = "audio_encoder"
METHODS = (ENCODER, "token_embedding", "text_decoder")


def frames(cfg) -> int:
    """Input frames the encoder takes: two convolutions (stride 1, then 2) per position."""
    return 2 * cfg.audio_config.max_source_positions


def audio_tokens(cfg) -> int:
    a = cfg.audio_config
    return a.max_source_positions * a.hidden_size // a.intermediate_size


def family_config(model) -> dict:
    from mlxbuild.families import embeds

    cfg = model.config
    return {**embeds.text_ids(model), "num_mel_bins": cfg.audio_config.num_mel_bins, "frames": frames(cfg),
            "audio_tokens": audio_tokens(cfg), "audio_token_id": cfg.audio_token_id}


def export(model, params: dict, flavour):
    import torch
    from torch import nn

    from mlxbuild.errors import BuildError
    from mlxbuild.families import embeds, hf
    from mlxbuild.families.common import export_methods

    cfg = model.config
    fc = family_config(model)
    if params["max_prefill_chunk"] < fc["audio_tokens"]:
        raise BuildError(f"export.max_prefill_chunk {params['max_prefill_chunk']}: ExecuTorch's multimodal "
                         f"runner prefills an audio window's {fc['audio_tokens']} embeddings in one "
                         f"text_decoder call, so the chunk must be at least that")
    dtype = hf.DTYPES[params["dtype"]]
    # The model was loaded with the flavour's attention, which is a decoder's (over its KV
    # cache); the encoder attends over its whole window with transformers' own SDPA, as
    # Whisper's does.
    model.model.audio_tower.set_attn_implementation("sdpa")

    class AudioEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model.model

        def forward(self, input_features):
            return self.m.get_audio_features(input_features).pooler_output.unsqueeze(0)

    modules = {ENCODER: AudioEncoder().eval(),
               **embeds.decoder_modules(cfg.text_config, model.model.language_model, model.lm_head, dtype, flavour,
                                        params)}
    examples = {ENCODER: ({"input_features": torch.zeros(1, fc["num_mel_bins"], fc["frames"], dtype=dtype)}, None),
                **embeds.decoder_examples(fc["hidden_size"], dtype, params["max_prefill_chunk"])}
    return export_methods(modules, examples, METHODS), fc


def constant_methods(params: dict, fc: dict) -> dict:
    """What ExecuTorch's multimodal runner reads, and the audio window's shape."""
    from mlxbuild.families import embeds

    methods = {**embeds.runner_constants(params, fc), "get_num_mel_bins": fc["num_mel_bins"],
               "get_num_frames": fc["frames"], "get_audio_tokens": fc["audio_tokens"]}
    if fc.get("audio_token_id") is not None:
        methods["audio_token_id"] = fc["audio_token_id"]
    return methods


def synthetic_features(n_mels: int, n_frames: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, n_mels, n_frames, generator=g) * 2.5 - 1.0


def with_prompt(model, inputs: dict, before: list[int], after: list[int]) -> dict:
    """``inputs`` with the text around the audio window replaced."""
    from mlxbuild.families import embeds

    fc = family_config(model)
    return embeds.media_prompt(inputs, ENCODER, fc["audio_token_id"], fc["audio_tokens"], before, after)


def reference_inputs(model, params: dict) -> dict:
    """BOS, one audio window (seeded log-mel), then seeded text tokens."""
    from mlxbuild.families import embeds, hf

    fc = family_config(model)
    suffix = embeds.seeded_text(fc, params["prompt"], params["seed"] + 1, [fc["audio_token_id"]])
    media = synthetic_features(fc["num_mel_bins"], fc["frames"], params["seed"]).to(hf.DTYPES[params["dtype"]])
    prefix = [fc["bos_token_id"]] if fc["bos_token_id"] is not None else []
    return with_prompt(model, {"media": media}, prefix, suffix)


def eager_generate(model, inputs: dict, new_tokens: int) -> list[int]:
    from mlxbuild.families import embeds

    return embeds.eager_generate(model, inputs["prompt_ids"], new_tokens, input_features=inputs["media"])


def eager_logits(model, inputs: dict, ids: list[int]):
    """Every position's logits along ``ids``, the audio embeddings at the prompt's placeholders."""
    import torch

    from mlxbuild.families import embeds

    with torch.no_grad():
        audio = model.get_audio_features(inputs["media"]).pooler_output
    return embeds.logits_with_media(model, inputs["prompt_ids"], ids, model.config.audio_token_id, audio)


def media(program, args):
    """[1, n_mels, frames]: ``--audio`` through transformers' WhisperFeatureExtractor (what
    Voxtral's processor uses), ``--features`` (.npy), or a seeded synthetic window."""
    import numpy as np
    import torch

    from mlxbuild.families import whisper_modules

    meta = program.constant_methods
    n_mels, n_frames = int(meta["get_num_mel_bins"]), int(meta["get_num_frames"])
    if getattr(args, "features", None) is not None:
        feats = np.load(args.features).astype(np.float32)
    elif getattr(args, "audio", None):
        feats = whisper_modules.log_mel(args.audio, n_mels, n_frames)
    else:
        feats = synthetic_features(n_mels, n_frames, args.seed).numpy()
    feats = feats if feats.ndim == 3 else feats[None]
    if feats.shape != (1, n_mels, n_frames):
        raise ValueError(f"features of shape {list(feats.shape)}; this audio encoder takes "
                         f"[1, {n_mels}, {n_frames}] ({n_mels} mel bins x {n_frames} frames)")
    return torch.from_numpy(np.ascontiguousarray(feats))
