"""Log-mel frames as audio arrives, for streaming speech programs
(``mlxbuild.families.voxtral_realtime``): the computation of transformers'
``VoxtralRealtimeFeatureExtractor`` (centred STFT with reflected edges, its Slaney mel
filters, log10 clamped below at a fixed maximum minus 8), frame by frame.

A frame is emitted once every sample its window covers has arrived; the frames whose
window runs past the end (the reflected right edge: 40 samples, ExecuTorch's
``stft_right_lookahead``) only when the stream ends. The frames equal what the extractor
gives on the whole utterance (``tests/test_voxtral_realtime.py``). The extractor is not
called per piece because its STFT centres (reflects) every call's edges.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE, HOP, WINDOW = 16000, 160, 400
HALF = WINDOW // 2


def metadata(chunk_mel_len: int) -> dict:
    """ExecuTorch's streaming Voxtral metadata for the audio frontend, by its names."""
    left = -(-HALF // HOP) * HOP
    return {"sample_rate": SAMPLE_RATE, "hop_length": HOP, "window_size": WINDOW,
            "chunk_mel_len": chunk_mel_len, "step_samples": chunk_mel_len * HOP,
            "stft_left_overlap": left, "mel_skip_frames": left // HOP,
            "stft_right_lookahead": (chunk_mel_len - 1) * HOP + HALF - chunk_mel_len * HOP}


def extractor(n_mels: int):
    from transformers import VoxtralRealtimeFeatureExtractor

    return VoxtralRealtimeFeatureExtractor(feature_size=n_mels, sampling_rate=SAMPLE_RATE, hop_length=HOP,
                                           n_fft=WINDOW, win_length=WINDOW)


def offline(samples: np.ndarray, n_mels: int) -> np.ndarray:
    """[1, n_mels, len // hop]: the extractor on the whole utterance."""
    feats = extractor(n_mels)(samples, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
    return np.asarray(feats, dtype=np.float32)


def read_audio(path, sample_rate: int = SAMPLE_RATE, step: int = 8 * HOP) -> np.ndarray:
    """A .wav as 16 kHz mono float32, padded with silence to whole steps (80 ms: one audio
    token each), as transformers' processor pads it."""
    from mlxbuild.families.whisper_modules import read_wav

    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"this program takes {sample_rate} Hz audio; the frontend computes {SAMPLE_RATE} Hz")
    x = read_wav(path)
    return np.pad(x, (0, (-len(x)) % step)).astype(np.float32)


class MelStream:
    """``push(samples, last)`` -> the new frames ``[1, n_mels, k]`` (k may be 0)."""

    def __init__(self, n_mels: int, meta: dict | None = None):
        import torch

        meta = meta or {}
        if int(meta.get("hop_length", HOP)) != HOP or int(meta.get("window_size", WINDOW)) != WINDOW:
            raise ValueError(f"the frontend computes hop {HOP} and window {WINDOW}; the program asks for "
                             f"{meta.get('hop_length')} and {meta.get('window_size')}")
        fe = extractor(n_mels)
        self.sample_rate, self.n_mels = SAMPLE_RATE, n_mels
        self.filters = torch.from_numpy(fe.mel_filters).to(torch.float32)
        self.window = torch.hann_window(WINDOW)
        self.floor = fe.global_log_mel_max - 8.0
        self.padded = np.zeros(0, dtype=np.float32)  # the reflected-edge signal, from sample `start`
        self.start = 0  # padded-signal index of self.padded[0]
        self.seen = 0  # samples received
        self.done = 0  # frames emitted
        self.head = np.zeros(0, dtype=np.float32)  # the first samples, until the left edge is reflected

    def push(self, samples, last: bool = False) -> np.ndarray:
        import torch

        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        self.seen += len(x)
        if self.start == 0 and len(self.padded) == 0:
            self.head = np.concatenate([self.head, x])
            if len(self.head) <= HALF and not last:
                return self._empty()
            # torch.stft(center=True) reflects: x[HALF], ..., x[1] before x[0]
            x, self.padded = self.head, self.head[HALF:0:-1].copy()
            self.head = np.zeros(0, dtype=np.float32)
        self.padded = np.concatenate([self.padded, x])
        if last:
            tail = self.padded[len(self.padded) - 2:len(self.padded) - 2 - HALF:-1] if len(self.padded) > HALF + 1 \
                else np.zeros(0, dtype=np.float32)
            self.padded = np.concatenate([self.padded, tail])
            total = self.seen // HOP  # the extractor drops the STFT's last frame
        else:
            total = max(0, (self.seen - HALF) // HOP + 1)  # frames whose window has arrived
        if total <= self.done:
            return self._empty()
        a = self.done * HOP - self.start
        seg = torch.from_numpy(self.padded[a:a + (total - self.done - 1) * HOP + WINDOW])
        spec = torch.stft(seg, WINDOW, HOP, window=self.window, center=False, return_complex=True)
        mel = self.filters.T @ (spec.abs() ** 2)
        log = torch.clamp(mel, min=1e-10).log10()
        log = (torch.maximum(log, torch.tensor(self.floor)) + 4.0) / 4.0
        self.done = total
        keep = self.done * HOP - self.start  # the next frame's window starts here
        self.padded, self.start = self.padded[keep:], self.start + keep
        return log.numpy()[None].astype(np.float32)

    def _empty(self) -> np.ndarray:
        return np.zeros((1, self.n_mels, 0), dtype=np.float32)
