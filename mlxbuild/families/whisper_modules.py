"""Whisper as ExecuTorch's ASR runner wants it: two methods of one program,

- ``encoder(input_features[1, n_mels, frames]) -> encoder_hidden_states[1, S, d]``
- ``text_decoder(decoder_input_ids[1, T], encoder_hidden_states[1, S, d],
  cache_position[T]) -> logits[1, T, V]``

(the method names ``executorch/extension/asr/runner/seq2seq_runner.cpp`` loads). The
decoder keeps its self-attention keys/values in a static cache (program state that
persists across calls); cross-attention keys/values are projected from the encoder
output on every call, so the decoder needs nothing but what the runner passes it.

The decoder is rebuilt here from the transformers modules' weights rather than
traced through ``WhisperDecoder.forward``: its cache objects and mask helpers do not
export with the backends' own cache ops. The self-attention cache is the export
flavour's ``DecoderCache`` (``backends.flavours``), which the export stage hands in.

Imports torch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _split_heads(x, heads: int):
    b, t, _ = x.shape
    return x.view(b, t, heads, -1).transpose(1, 2)


def _merge_heads(x):
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


class DecoderLayer(nn.Module):
    def __init__(self, layer, cache: nn.Module):
        super().__init__()
        self.layer, self.cache = layer, cache
        self.heads = layer.self_attn.num_heads

    def forward(self, h, encoder_hidden_states, start, positions):
        layer, heads = self.layer, self.heads
        attn = layer.self_attn
        x = layer.self_attn_layer_norm(h)
        # transformers scales the query before the product (and attends with scale 1.0); so do we.
        q = _split_heads(attn.q_proj(x) * attn.scaling, heads)
        k, v = _split_heads(attn.k_proj(x), heads), _split_heads(attn.v_proj(x), heads)
        h = h + attn.out_proj(_merge_heads(self.cache.attend(q, k, v, start, positions)))

        cross = layer.encoder_attn
        x = layer.encoder_attn_layer_norm(h)
        q = _split_heads(cross.q_proj(x) * cross.scaling, heads)
        k = _split_heads(cross.k_proj(encoder_hidden_states), heads)
        v = _split_heads(cross.v_proj(encoder_hidden_states), heads)
        h = h + cross.out_proj(_merge_heads(F.scaled_dot_product_attention(q, k, v, scale=1.0)))

        x = layer.final_layer_norm(h)
        return h + layer.fc2(layer.activation_fn(layer.fc1(x)))


class WhisperEncoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.encoder = model.get_encoder()

    def forward(self, input_features):
        return self.encoder(input_features=input_features).last_hidden_state


class WhisperTextDecoder(nn.Module):
    def __init__(self, model, cache, max_len: int):
        super().__init__()
        decoder = model.get_decoder()
        dtype = decoder.embed_tokens.weight.dtype
        head_dim = model.config.d_model // model.config.decoder_attention_heads
        self.max_len = max_len
        self.embed_tokens, self.embed_positions = decoder.embed_tokens, decoder.embed_positions
        self.layer_norm, self.proj_out = decoder.layer_norm, model.proj_out
        self.layers = nn.ModuleList(
            DecoderLayer(layer, cache(layer.self_attn.num_heads, head_dim, max_len, dtype))
            for layer in decoder.layers)

    def forward(self, decoder_input_ids, encoder_hidden_states, cache_position):
        start = cache_position[0].item()
        torch._check(start >= 0)
        torch._check(start + decoder_input_ids.shape[1] <= self.max_len)
        # Positions come from the start and the length, so one-token calls with a [1]
        # cache_position (ExecuTorch's seq2seq runner) and chunked calls agree.
        positions = torch.arange(decoder_input_ids.shape[1], device=decoder_input_ids.device) + start
        h = self.embed_tokens(decoder_input_ids) + F.embedding(positions, self.embed_positions.weight)
        for layer in self.layers:
            h = layer(h, encoder_hidden_states, start, positions)
        return self.proj_out(self.layer_norm(h))


def frames(config) -> int:
    """Input frames the encoder takes: two conv strides (1, then 2) per encoder position."""
    return 2 * config.max_source_positions


def example_inputs(config, dtype, max_chunk: int) -> dict:
    """Per method: (kwargs, dynamic shapes)."""
    feats = torch.zeros(1, config.num_mel_bins, frames(config), dtype=dtype)
    hidden = torch.zeros(1, config.max_source_positions, config.d_model, dtype=dtype)
    n = min(2, max_chunk)
    dec = {"decoder_input_ids": torch.zeros(1, n, dtype=torch.long), "encoder_hidden_states": hidden,
           "cache_position": torch.arange(n)}
    dyn = None
    if max_chunk > 1:
        t = torch.export.Dim("dec_len", min=1, max=max_chunk)
        dyn = {"decoder_input_ids": {1: t}, "encoder_hidden_states": None, "cache_position": {0: t}}
    return {"encoder": ({"input_features": feats}, None), "text_decoder": (dec, dyn)}


def synthetic_features(config, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """A log-mel-like input: values in Whisper's normalized range [-1, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, config.num_mel_bins, frames(config), generator=g) * 2.5 - 1.0
    return x.to(dtype)


SAMPLE_RATE = 16000  # Whisper's feature extractor: 16 kHz, hop 160 (100 frames per second)


def read_wav(path) -> np.ndarray:
    """A PCM .wav file as mono float32 at 16 kHz (stdlib reader; linear resampling)."""
    import wave

    with wave.open(str(path), "rb") as w:
        rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
        raw = w.readframes(w.getnframes())
    if width not in (1, 2, 4):
        raise ValueError(f"{path}: {8 * width}-bit samples are not supported (8, 16 or 32-bit PCM)")
    kind = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
    x = np.frombuffer(raw, dtype=kind).astype(np.float32)
    x = (x - 128.0) / 128.0 if width == 1 else x / float(np.iinfo(kind).max)
    x = x.reshape(-1, channels).mean(axis=1)
    if rate != SAMPLE_RATE and len(x):
        t = np.arange(int(len(x) * SAMPLE_RATE / rate)) * (rate / SAMPLE_RATE)
        x = np.interp(t, np.arange(len(x)), x).astype(np.float32)
    return x


def log_mel(path, n_mels: int, frames: int) -> np.ndarray:
    """[1, n_mels, frames] log-mel features of a .wav file, computed by transformers'
    WhisperFeatureExtractor (no download: its mel filters are computed locally), padded
    or cut to the `frames` the encoder takes."""
    from transformers import WhisperFeatureExtractor

    seconds = max(1, -(-frames // 100))
    fe = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=SAMPLE_RATE, chunk_length=seconds)
    feats = fe(read_wav(path), sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
    feats = feats[:, :, :frames]
    if feats.shape[-1] < frames:
        feats = np.pad(feats, ((0, 0), (0, 0), (0, frames - feats.shape[-1])), constant_values=feats.min())
    return feats.astype(np.float32)
