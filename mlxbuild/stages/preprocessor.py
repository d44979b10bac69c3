"""A Whisper model's audio preprocessor (``mlxbuild.families.audio``): ExecuTorch's
``WhisperAudioProcessor`` exported for waveforms up to ``max_audio_s`` and lowered to
XNNPACK, as ExecuTorch's Whisper example ships it, with the processor config beside it.
Before it is kept, the program runs here on a seeded waveform and must give what
transformers' ``WhisperFeatureExtractor``, built from the shipped config, gives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mlxbuild.errors import VerificationError
from mlxbuild.families import audio
from mlxbuild.steps import PreprocessorParams

# The example's backend; an XNNPACK program runs on the CPU of every platform the
# targets run on (Apple's included), whichever backend runs the model.
BACKEND = "xnnpack"
# WhisperAudioProcessor differs from transformers by < 1e-4 (its Hann window is computed,
# not torch.hann_window); a wrong setting moves log-mels by far more.
MAX_ABS_ERROR = 1e-3
RESULT = "preprocessor.json"


def run(params: PreprocessorParams, cache, out: Path) -> dict:
    import torch
    from executorch.extension.audio.mel_spectrogram import WhisperAudioProcessor
    from transformers import WhisperFeatureExtractor

    import backends
    from mlxbuild import progress

    f = params.feature
    sr, hop, frames = int(f["sampling_rate"]), int(f["hop_length"]), int(f["nb_max_frames"])
    n_samples = frames * hop
    processor = WhisperAudioProcessor(
        feature_size=int(f["feature_size"]), sampling_rate=sr, hop_length=hop, n_fft=int(f["n_fft"]),
        chunk_length=max(1, n_samples // sr), padding_value=float(f["padding_value"]),
        max_audio_len=params.max_audio_s).eval()
    # A chunk of the encoder's frames, also where that is not whole seconds (synthetic models).
    processor.n_samples, processor.nb_max_frames = n_samples, frames

    progress.note(f"torch.export (waveforms up to {params.max_audio_s} s)")
    max_samples = params.max_audio_s * sr
    example = torch.zeros(min(n_samples + n_samples // 2, max_samples))
    shapes = torch.export.ShapesCollection()
    shapes[example] = {0: torch.export.Dim.DYNAMIC(max=max_samples)}
    with torch.no_grad(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
        program = torch.export.export(processor, (example,), dynamic_shapes=shapes, strict=True)
    progress.note(f"lowering to {BACKEND}")
    _, prog = backends.backend(BACKEND).lower({"forward": program}, {}, {})
    (out / audio.PTE).write_bytes(prog.buffer)

    if params.config_file:
        shutil.copyfile(params.config_file, out / audio.CONFIG_FILE)
    else:
        extractor = WhisperFeatureExtractor(
            feature_size=int(f["feature_size"]), sampling_rate=sr, hop_length=hop, n_fft=int(f["n_fft"]),
            chunk_length=max(1, n_samples // sr), padding_value=float(f["padding_value"]))
        extractor.n_samples, extractor.nb_max_frames = n_samples, frames
        extractor.to_json_file(str(out / audio.CONFIG_FILE))
    # What an app needs to feed it: mono float32 samples at this rate, at most this long.
    result = {"sampling_rate": sr, "max_audio_s": params.max_audio_s, **check(out, f)}
    (out / RESULT).write_text(json.dumps(result, indent=1))
    return result


def check(folder: Path, feature: dict) -> dict:
    """The program against transformers' extractor loaded from the config beside it, on a
    seeded waveform shorter than one chunk; raises VerificationError when they differ."""
    import numpy as np
    import torch
    from transformers import WhisperFeatureExtractor

    from backends import et_runtime

    extractor = WhisperFeatureExtractor.from_pretrained(str(folder))
    frames, hop = int(feature["nb_max_frames"]), int(feature["hop_length"])
    wave = (0.1 * np.random.default_rng(0).standard_normal(frames * hop * 7 // 10)).astype(np.float32)
    with et_runtime.native_stderr_captured():
        got = et_runtime.load(folder / audio.PTE).run("forward", [torch.from_numpy(wave)])[0]
    got = np.asarray(got, dtype=np.float32)
    want = extractor(wave, sampling_rate=extractor.sampling_rate, return_tensors="np").input_features
    shape = [1, int(feature["feature_size"]), frames]
    if list(got.shape) != shape or list(want.shape) != shape:
        raise VerificationError(f"preprocessor: features of shape {list(got.shape)} (transformers "
                                f"{list(want.shape)}); the encoder takes {shape}")
    err = float(np.abs(got - want).max())
    if err > MAX_ABS_ERROR:
        raise VerificationError(f"preprocessor: log-mel features differ from transformers' "
                                f"WhisperFeatureExtractor by {err:.3g} (bound {MAX_ABS_ERROR})")
    return {"backend": BACKEND, "features": shape, "max_abs_error_vs_transformers": err,
            "bound": MAX_ABS_ERROR}
