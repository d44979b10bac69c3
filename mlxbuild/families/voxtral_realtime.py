"""streaming-speech-to-text: Voxtral Realtime (transformers' ``voxtral_realtime``), a causal
audio encoder feeding a text decoder one token per 80 ms of audio, as ExecuTorch's
streaming export of it (``examples/models/voxtral_realtime/export_voxtral_rt.py --streaming``)
lays out its program:

- ``encode_audio_chunk(mel_chunk[1, n_mels, 8], enc_pos[4]) -> audio_embeds[1, 1, D]``: one
  chunk of log-mel frames through the causal convolutions (their left context kept in
  mutable buffers) and the encoder's layers (a sliding-window KV cache, a ring where the
  flavour has one), four encoder frames folded into one audio token by the projector;
- ``token_embedding(token_ids[1, T]) -> embeds[1, T, D]``;
- ``text_decoder(input_embeds[1, T, D], cache_position[T]) -> logits[1, T, V]`` over the
  flavour's KV cache, the delay's time conditioning baked in;

plus ExecuTorch's metadata names as constant methods (``sample_rate``, ``chunk_mel_len``,
``num_mel_bins``, ``hop_length``, ``window_size``, ``downsample_factor``, ...) and
``get_prompt_ids``. Position ``p`` of the decoder takes ``token_embedding(token_p) +
audio_embeds_p``: the prompt's tokens first, then each token the decoder chose at the
position before; one token per audio token, so a transcript grows as audio arrives.

Why this family: ExecuTorch ships a streaming export and its method contract for it (neither
Moonshine streaming nor Nemotron streaming ASR has one), and its encoder is causal, so the
streamed transcript is the offline one by construction rather than by approximation. The
verification checks exactly that: the artifact fed chunk by chunk against transformers'
``generate`` on the whole utterance.

A chunk call at ``enc_pos[0] == 0`` starts a new stream: the convolutions' left context is
zeroed (transformers pads with zeros), and the encoder's KV cache is overwritten from
position 0 (attention never reads past the current position).

The encoder's KV cache holds ``4 * max_context_length`` frames (every audio token the
decoder can take), or its sliding window as a ring on MLX and XNNPACK. The mel frontend is
``mlxbuild.families.streaming_mel`` (transformers' feature extractor, frame by frame).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

NAME = "streaming-speech-to-text"
METHODS = ("encode_audio_chunk", "token_embedding", "text_decoder")
USES_FLAVOUR_ATTENTION = True
CHUNK_ENC = 4  # encoder frames per chunk call: the mel chunk after the stride-2 convolution
VERIFY_TOKENS = 24  # audio tokens (80 ms each) of the verification input
NAMED = "voxtral_realtime"


def verify_spec(max_context_length: int, max_prefill_chunk: int) -> dict:
    """No prompt of the plan's (the model's own delay prompt is in its config); a decode
    step per audio token of the verification input."""
    return {"prompt": 0, "decode_steps": min(VERIFY_TOKENS, max_context_length), "seed": 0}


# --------------------------------------------------------------------------- the model


def audio_config(model) -> dict:
    """What the constant methods publish and the runner and the reference need."""
    cfg = model.config
    text, audio = cfg.text_config, cfg.audio_config
    return {"model_type": cfg.model_type, "vocab_size": text.vocab_size, "num_mel_bins": audio.num_mel_bins,
            "chunk_mel_len": cfg.audio_length_per_tok, "downsample_factor": cfg.downsample_factor,
            "dim": text.hidden_size, "enc_dim": audio.hidden_size, "delay_tokens": cfg.default_num_delay_tokens,
            "prompt_ids": prompt_ids(cfg), "eos_token_id": _listed(text.eos_token_id),
            "enc_sliding_window": audio.sliding_window}


def _listed(value):
    return value if isinstance(value, list) or value is None else [value]


def prompt_ids(cfg) -> list[int]:
    """What the decoder takes before its first own token: BOS, then a streaming pad token for
    each token of delay (what transformers' processor asks of mistral_common in streaming
    mode, without left-padded audio). The pad is the text config's ``pad_token_id`` (BOS
    where it has none)."""
    text = cfg.text_config
    bos = int(text.bos_token_id if text.bos_token_id is not None else 1)
    pad = int(text.pad_token_id if text.pad_token_id is not None else bos)
    return [bos] + [pad] * int(cfg.default_num_delay_tokens)


def _modules(model, params: dict, flavour):
    import torch
    from torch import nn

    from mlxbuild.families import embeds, hf

    dtype = hf.DTYPES[params["dtype"]]
    cfg = model.config
    inner = model.model
    with torch.no_grad():
        t_cond = inner.time_embedding(torch.full((1,), float(cfg.default_num_delay_tokens), dtype=dtype))[None]
    modules = embeds.decoder_modules(cfg.text_config, inner.language_model, model.lm_head, dtype, flavour, params,
                                     extra={"t_cond": t_cond.to(dtype)})
    encoder = embeds.cached(embeds.AsCausalLM(cfg.audio_config, inner.audio_tower, dtype), flavour,
                            CHUNK_ENC * params["max_context_length"], CHUNK_ENC)

    class EncodeAudioChunk(nn.Module):
        def __init__(self):
            super().__init__()
            emb = inner.audio_tower.embedder
            self.conv1, self.conv2, self.encoder = emb.conv1, emb.conv2, encoder
            self.projector, self.fold = inner.multi_modal_projector, cfg.downsample_factor
            self.register_buffer("conv1_state", torch.zeros(1, emb.conv1.in_channels, emb.conv1.left_pad,
                                                            dtype=dtype), persistent=False)
            self.register_buffer("conv2_state", torch.zeros(1, emb.conv2.in_channels, emb.conv2.left_pad,
                                                            dtype=dtype), persistent=False)

        def _causal(self, conv, state, x, fresh):
            # The left context the previous chunk left, zero at a stream's start (what
            # transformers' zero padding gives the first chunk).
            x = torch.cat([torch.where(fresh, torch.zeros_like(state), state), x], dim=-1)
            state.copy_(x[:, :, x.shape[-1] - state.shape[-1]:])
            return nn.functional.gelu(nn.Conv1d.forward(conv, x))

        def forward(self, mel_chunk, enc_pos):
            fresh = enc_pos[:1].view(1, 1, 1) == 0
            h = self._causal(self.conv1, self.conv1_state, mel_chunk, fresh)
            h = self._causal(self.conv2, self.conv2_state, h, fresh).permute(0, 2, 1)
            h = self.encoder(inputs_embeds=h, cache_position=enc_pos)
            return self.projector(h.reshape(1, -1, h.shape[-1] * self.fold))

    return {"encode_audio_chunk": EncodeAudioChunk().eval(), **modules}


def _check_supported(model, params: dict) -> None:
    from mlxbuild.errors import BuildError

    cfg = model.config
    fold = cfg.audio_length_per_tok // 2
    if cfg.downsample_factor != fold or cfg.audio_length_per_tok % 2:
        raise BuildError(f"streaming-speech-to-text: audio_length_per_tok {cfg.audio_length_per_tok} and "
                         f"downsample_factor {cfg.downsample_factor} do not make one audio token per chunk "
                         f"(the stride-2 convolution halves a chunk; {CHUNK_ENC} encoder frames per token)")
    if fold != CHUNK_ENC:
        raise BuildError(f"streaming-speech-to-text: {fold} encoder frames per audio token; the streaming "
                         f"layout (ExecuTorch's encode_audio_chunk) takes {CHUNK_ENC}")


def export(model, params: dict, flavour):
    import torch

    from mlxbuild.families import embeds, hf
    from mlxbuild.families.common import export_methods

    _check_supported(model, params)
    dtype = hf.DTYPES[params["dtype"]]
    cfg = model.config
    modules = _modules(model, params, flavour)
    examples = {
        "encode_audio_chunk": ({"mel_chunk": torch.zeros(1, cfg.audio_config.num_mel_bins, cfg.audio_length_per_tok,
                                                         dtype=dtype),
                                "enc_pos": torch.arange(CHUNK_ENC)}, None),
        **embeds.decoder_examples(cfg.text_config.hidden_size, dtype, params["max_prefill_chunk"]),
    }
    return export_methods(modules, examples, METHODS), {"audio_config": audio_config(model)}


def constant_methods(params: dict, info: dict) -> dict:
    """ExecuTorch's streaming Voxtral metadata, by its names, and the KV-cache methods."""
    from mlxbuild.families import streaming_mel
    from mlxbuild.families.common import kv_cache_methods

    ac = info["audio_config"]
    methods = {**kv_cache_methods(params), **streaming_mel.metadata(ac["chunk_mel_len"]),
               "streaming": 1, "num_mel_bins": ac["num_mel_bins"], "downsample_factor": ac["downsample_factor"],
               "dim": ac["dim"], "enc_dim": ac["enc_dim"], "vocab_size": ac["vocab_size"],
               "get_vocab_size": ac["vocab_size"], "max_seq_len": params["max_context_length"],
               "max_enc_len": CHUNK_ENC * params["max_context_length"], "conv1_pad": 2, "conv2_pad": 1,
               "delay_tokens": ac["delay_tokens"], "get_prompt_ids": ac["prompt_ids"]}
    if ac.get("eos_token_id"):
        methods["get_eos_ids"] = ac["eos_token_id"]
    return methods


# --------------------------------------------------------------------------- reference


def synthetic_features(num_mel_bins: int, tokens: int, chunk: int = 8, seed: int = 0):
    """A log-mel-like input of ``tokens`` audio tokens: values in the extractor's range."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, num_mel_bins, tokens * chunk, generator=g) * 2.5 - 1.0


def reference(model, params: dict, out: Path) -> dict:
    """transformers on the whole utterance: the projected audio embeddings, greedy
    ``generate`` (one token per audio token), and every position's logits."""
    import numpy as np
    import torch

    from mlxbuild.families import hf

    dtype = hf.DTYPES[params["dtype"]]
    ac = audio_config(model)
    n = params["decode_steps"]
    feats = synthetic_features(ac["num_mel_bins"], n, ac["chunk_mel_len"], params["seed"]).to(dtype)
    result = transcribe_eager(model, feats)
    with torch.no_grad():
        audio = model.get_audio_features(input_features=feats).pooler_output
        ids = torch.tensor([result["all_ids"]])
        logits = model(input_ids=ids, input_features=feats, num_delay_tokens=ac["delay_tokens"]).logits
    np.save(out / "features.npy", feats.float().numpy())
    np.save(out / "audio_embeds.npy", audio[0].float().numpy())
    np.save(out / "tokens.npy", np.array(result["all_ids"], dtype=np.int64))
    np.save(out / "logits.npy", logits[0].float().numpy())
    return {"model_type": NAMED, "prompt": len(ac["prompt_ids"]), "positions": n}


def transcribe_eager(model, features) -> dict:
    """transformers' own greedy ``generate`` over the whole utterance (offline): the
    prompt, then a token per remaining audio token."""
    import torch

    ac = audio_config(model)
    prompt = torch.tensor([ac["prompt_ids"]])
    with torch.no_grad():
        # The mask is given: generate() would infer one from pad_token_id, and a prompt of
        # streaming pads (or a BOS that doubles as pad) would be masked out.
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), input_features=features,
                             num_delay_tokens=ac["delay_tokens"], do_sample=False, eos_token_id=None,
                             pad_token_id=ac["prompt_ids"][0])
    ids = out[0].tolist()
    return {"all_ids": ids, "tokens": ids[len(ac["prompt_ids"]):]}


# --------------------------------------------------------------------------- the artifact


class Stream:
    """The artifact driven as audio arrives: ``push(mel_frames)`` encodes every whole chunk
    of 8 frames and advances the decoder by a position per chunk (the prompt's first, in one
    prefill once its audio tokens are in); ``tokens`` is the transcript so far."""

    def __init__(self, program, keep_logits: bool = False):
        import numpy as np

        meta = program.constant_methods
        self.program, self.keep = program, keep_logits
        self.chunk = int(meta.get("chunk_mel_len", 8))
        self.prompt = [int(t) for t in meta["get_prompt_ids"]]
        self.limit = int(meta.get("get_max_context_len") or meta.get("max_seq_len"))
        self.prefill = int(meta.get("get_prefill_chunk_size") or 1)
        self.dtype = _dtype(program)
        self.pending = np.zeros((1, int(meta["num_mel_bins"]), 0), dtype=np.float32)
        self.audio, self.ids, self.logits, self.rows = [], [], None, []
        for name in METHODS:
            program.reset(name)

    @property
    def tokens(self) -> list[int]:
        """A token per audio position after the prompt's (what ``generate`` gives for the
        audio so far); the choice the last position made waits for the next audio token."""
        return self.ids[len(self.prompt):len(self.audio)]

    def push(self, frames) -> int:
        """Feed log-mel frames ``[1, n_mels, k]``; returns the audio tokens this added."""
        import numpy as np
        import torch

        self.pending = np.concatenate([self.pending, np.asarray(frames, dtype=np.float32)], axis=-1)
        added = 0
        while self.pending.shape[-1] >= self.chunk and len(self.audio) < self.limit:
            mel = torch.from_numpy(np.ascontiguousarray(self.pending[:, :, :self.chunk])).to(self.dtype)
            self.pending = self.pending[:, :, self.chunk:]
            pos = CHUNK_ENC * len(self.audio)
            self.audio.append(self.program.run("encode_audio_chunk", [mel, torch.arange(pos, pos + CHUNK_ENC)])[0])
            added += 1
            self._decode()
        return added

    def _decode(self) -> None:
        import torch

        from mlxbuild.families.common import as_numpy

        n = len(self.audio)
        if n < len(self.prompt):
            return
        if n == len(self.prompt):  # the prompt's positions, in prefill chunks
            self.ids = list(self.prompt)
            spans = [(a, min(a + self.prefill, n)) for a in range(0, n, self.prefill)]
        else:
            spans = [(n - 1, n)]
        for a, b in spans:
            emb = self.program.run("token_embedding", [torch.tensor([self.ids[a:b]])])[0]
            emb = emb + torch.cat(self.audio[a:b], dim=1).to(emb.dtype)
            out = self.program.run("text_decoder", [emb, torch.arange(a, b)])[0]
            if self.keep:
                self.rows.append(as_numpy(out)[0].astype("float32"))
            self.logits = out
        # the token for the next audio position
        self.ids.append(int(self.logits[0, -1].float().argmax()))


def _dtype(program):
    import torch

    name = program.input_dtype("encode_audio_chunk", 0)
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, torch.float32)


def stream_features(program, features, keep_logits: bool = False) -> Stream:
    """The whole of ``features`` through a stream, a chunk at a time."""
    s = Stream(program, keep_logits)
    s.push(features)
    return s


def verify(program, reference_dir: Path, info: dict, tol: dict) -> dict:
    """The artifact streamed chunk by chunk on the reference's features: its audio
    embeddings and every decoder position's logits against transformers on the whole
    utterance; then its greedy transcript, token for token, against ``generate``'s (they
    may part only at a near tie: ``common.first_parting``)."""
    import numpy as np
    import torch

    from mlxbuild.families.common import as_numpy, compare, compare_tensor, first_parting

    feats = np.load(reference_dir / "features.npy")
    ref_audio = np.load(reference_dir / "audio_embeds.npy")
    ids = np.load(reference_dir / "tokens.npy").tolist()
    ref = np.load(reference_dir / "logits.npy")
    # teacher-forced on the reference's tokens: the logits of every position
    forced = Stream(program, keep_logits=True)
    forced.prompt = ids  # every position "prompted" with eager's token: the rows are comparable
    forced.prefill = 1
    forced.push(feats)
    got_audio = torch.cat(forced.audio, dim=1)[0]
    enc = compare_tensor(as_numpy(got_audio).astype(np.float32), ref_audio, tol)
    result = compare(np.concatenate(forced.rows), ref, tol)
    result["audio_encoder"] = enc
    if not enc["passed"]:
        result.update(passed=False, reason=f"audio encoder: {enc['reason']}"
                      + (f"; decoder: {result['reason']}" if result["reason"] else ""))
    if result["passed"]:
        free = stream_features(program, feats)
        srt = np.sort(ref, axis=-1)
        prompt = info["prompt"]
        margins = (srt[:, -1] - srt[:, -2])[prompt - 1:].tolist()
        parted = first_parting(free.tokens, ids[prompt:], margins, float(result["max_abs_error"]), "the stream")
        result["stream"] = parted or {"passed": free.tokens == ids[prompt:], "matched": len(free.tokens)}
        if not result["stream"]["passed"]:
            result.update(passed=False, reason=f"streamed transcript: {result['stream'].get('reason', 'differs')}")
    return result


# --------------------------------------------------------------------------- mlxbuild run


def prepare_inputs(program, args, tokenizer) -> None:
    from mlxbuild.families import streaming_mel

    meta = program.constant_methods
    n_mels = int(meta["num_mel_bins"])
    args.samples = None
    if getattr(args, "features", None) is not None:
        import numpy as np

        feats = np.load(args.features).astype(np.float32)
        feats = feats if feats.ndim == 3 else feats[None]
        if feats.ndim != 3 or feats.shape[:2] != (1, n_mels):
            raise ValueError(f"{args.features}: features of shape {list(feats.shape)}; this encoder takes "
                             f"[1, {n_mels}, frames] ({n_mels} mel bins)")
        args.mel_source = feats
    elif getattr(args, "audio", None):
        args.mel_source = streaming_mel.MelStream(n_mels, meta)
        args.samples = streaming_mel.read_audio(args.audio, int(meta["sample_rate"]), int(meta["step_samples"]))
    elif getattr(args, "stream", False):
        raise ValueError("--stream feeds --audio as it arrives: give a .wav file")
    else:
        args.mel_source = synthetic_features(n_mels, min(VERIFY_TOKENS, int(meta["max_seq_len"])),
                                             int(meta.get("chunk_mel_len", 8)), args.seed).numpy()


def run(program, args) -> dict:
    """Transcribe: ``--audio`` arrives in ``--chunk-ms`` pieces with ``--stream`` (each
    piece's new mel frames encoded and decoded before the next is read; ``on_partial``
    hears the transcript so far and the piece's latency), else whole; ``--features`` and
    the synthetic input go through the same stream, whole."""
    stream, chunks = Stream(program), []
    t0 = time.perf_counter()
    if args.samples is None:
        stream.push(args.mel_source)
    else:
        source, samples = args.mel_source, args.samples
        streaming = getattr(args, "stream", False)
        step = max(1, int(source.sample_rate * args.chunk_ms / 1000)) if streaming else len(samples)
        for a in range(0, len(samples), step):
            t = time.perf_counter()
            frames = source.push(samples[a:a + step], last=a + step >= len(samples))
            added = stream.push(frames)
            chunk = {"audio_ms": round(1000 * min(a + step, len(samples)) / source.sample_rate),
                     "audio_tokens": added, "latency_ms": 1000 * (time.perf_counter() - t),
                     "tokens": list(stream.tokens)}
            chunks.append(chunk)
            if streaming and getattr(args, "on_partial", None):
                args.on_partial(chunk)
    return {"prompt": stream.prompt, "tokens": stream.tokens, "audio_tokens": len(stream.audio),
            "chunks": chunks, "seconds": time.perf_counter() - t0}


def describe(result: dict) -> list[str]:
    lines = [f"prompt ({len(result['prompt'])}): {' '.join(map(str, result['prompt']))}",
             f"transcription ({len(result['tokens'])} tokens from {result['audio_tokens']} audio tokens): "
             f"{' '.join(map(str, result['tokens']))}"]
    if "text" in result:
        lines.append(f"text: {result['text']}")
    if len(result["chunks"]) > 1:
        lat = sorted(c["latency_ms"] for c in result["chunks"])
        lines.append(f"{len(lat)} audio pieces, latency per piece: median {lat[len(lat) // 2]:.1f} ms, "
                     f"max {lat[-1]:.1f} ms")
    lines.append(f"total {result['seconds'] * 1000:.1f} ms")
    return lines


def describe_partial(chunk: dict, tokenizer=None) -> str:
    """One line per piece of audio as it arrives: time, new audio tokens, latency, transcript."""
    said = tokenizer.decode(chunk["tokens"]) if tokenizer is not None else " ".join(map(str, chunk["tokens"]))
    return (f"[{chunk['audio_ms']:>6} ms] +{chunk['audio_tokens']} audio tokens, "
            f"{chunk['latency_ms']:6.1f} ms: {said}")
