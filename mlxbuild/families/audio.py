"""Whisper's audio preprocessor, as ExecuTorch's Whisper and Voxtral examples ship it beside the model:
a program that turns a mono 16 kHz waveform into the log-mel features the ``encoder`` takes
(``executorch.extension.audio.mel_spectrogram.WhisperAudioProcessor``, the same computation
as transformers' ``WhisperFeatureExtractor``), and the processor's ``preprocessor_config.json``.

Torch-free: the plan reads the spec from the manifest (a synthetic model's config) or the
checkpoint folder (its ``config.json`` and ``preprocessor_config.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

PTE = "preprocessor.pte"
CONFIG_FILE = "preprocessor_config.json"
FILES = (PTE, CONFIG_FILE)
# ExecuTorch's example bounds the waveform at 600 s; a synthetic model's short chunks get
# 30 of them, which keeps the planned memory small.
MAX_AUDIO_S = 600
MAX_CHUNKS = 30
_FEATURE_KEYS = ("feature_size", "sampling_rate", "hop_length", "n_fft", "padding_value")


def spec(model_type: str | None, config: dict, folder: Path | None = None) -> dict | None:
    """The preprocessor step's params for a Whisper (or Voxtral) model, else None. ``nb_max_frames`` is
    what the encoder takes (two frames per encoder position); the checkpoint's
    ``preprocessor_config.json``, when there is one, gives the rest and is shipped as it is."""
    if model_type == "voxtral":
        # Voxtral's audio tower is Whisper's encoder: the same features (its processor is a
        # WhisperFeatureExtractor), sized by the audio config.
        config = config.get("audio_config") or {}
    elif model_type != "whisper":
        return None
    feature = {"feature_size": int(config.get("num_mel_bins", 80)), "sampling_rate": 16000,
               "hop_length": 160, "n_fft": 400, "padding_value": 0.0}
    config_file = folder / CONFIG_FILE if folder is not None and (folder / CONFIG_FILE).is_file() else None
    if config_file is not None:
        given = json.loads(config_file.read_text())
        feature.update({k: given[k] for k in _FEATURE_KEYS if k in given})
    frames = 2 * int(config.get("max_source_positions", 1500))
    feature["nb_max_frames"] = frames
    chunk_s = frames * feature["hop_length"] / feature["sampling_rate"]
    return {"feature": feature, "config_file": None if config_file is None else str(config_file),
            "max_audio_s": int(min(MAX_AUDIO_S, max(1, round(MAX_CHUNKS * chunk_s))))}
