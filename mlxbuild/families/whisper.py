"""Whisper (speech-to-text, encoder-decoder): two methods of one program, named as
ExecuTorch's seq2seq ASR runner (``extension/asr/runner/seq2seq_runner``) loads them,

- ``encoder(input_features[1, n_mels, frames]) -> encoder_hidden_states[1, S, d]`` (static shape);
- ``text_decoder(decoder_input_ids[1, T], encoder_hidden_states, cache_position[T]) -> logits[1, T, V]``
  with a static self-attention KV cache (T dynamic up to ``max_prefill_chunk``; the runner
  feeds one token with a one-element ``cache_position``),

plus constant methods for a transcription loop: ``get_decoder_start_ids`` (the start token
and the forced language/task/no-timestamps tokens the generation config implies),
``decoder_start_token_id``, ``get_eos_ids``, ``get_max_seq_len``/``get_max_context_len``
(decoder cache), ``get_prefill_chunk_size``, ``get_vocab_size``, ``get_num_mel_bins``,
``get_num_frames`` (input frames the encoder takes), ``get_encoder_seq_len``.

Verification: a synthetic log-mel input through ``encoder`` (compared with the eager
encoder), then ``text_decoder`` on the artifact's own encoder output: a prefill of the
start ids (padded with seeded tokens to ``prompt``) and greedy single-token steps, every
logit row against the eager ``WhisperForConditionalGeneration`` quantized the same way.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlxbuild.families import asr_runner

NAME = "whisper"
METHODS = ("encoder", "text_decoder")


def decoder_start_ids(model) -> list[int]:
    """What Whisper's generate() puts before the first generated token for English
    transcription without timestamps: start, language, task, no-timestamps -- each only
    where the generation config defines it (a synthetic model has just the start)."""
    gen, cfg = model.generation_config, model.config
    start = gen.decoder_start_token_id if gen.decoder_start_token_id is not None else cfg.decoder_start_token_id
    ids = [int(start)]
    lang = (getattr(gen, "lang_to_id", None) or {}).get("<|en|>")
    if getattr(gen, "is_multilingual", False) and lang is not None:
        ids.append(int(lang))
    task = (getattr(gen, "task_to_id", None) or {}).get("transcribe")
    if getattr(gen, "is_multilingual", False) and task is not None:
        ids.append(int(task))
    if getattr(gen, "no_timestamps_token_id", None) is not None:
        ids.append(int(gen.no_timestamps_token_id))
    return ids


def speech_config(model) -> dict:
    from mlxbuild.families import whisper_modules

    cfg = model.config
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
        else cfg.eos_token_id
    return {"model_type": cfg.model_type, "vocab_size": cfg.vocab_size, "num_mel_bins": cfg.num_mel_bins,
            "frames": whisper_modules.frames(cfg), "encoder_seq_len": cfg.max_source_positions,
            "d_model": cfg.d_model, "max_target_positions": cfg.max_target_positions,
            "decoder_start_ids": decoder_start_ids(model),
            "eos_token_id": eos if isinstance(eos, list) or eos is None else [eos]}


def _check_supported(model, params: dict) -> None:
    from mlxbuild.errors import BuildError

    cfg = model.config
    if params["max_context_length"] > cfg.max_target_positions:
        raise BuildError(f"speech-to-text: export.max_context_length {params['max_context_length']} exceeds "
                         f"the decoder's max_target_positions ({cfg.max_target_positions})")


def export(model, params: dict, flavour):
    from mlxbuild.families import hf, whisper_modules
    from mlxbuild.families.common import export_methods

    _check_supported(model, params)
    dtype = hf.DTYPES[params["dtype"]]
    modules = {"encoder": whisper_modules.WhisperEncoder(model).eval(),
               "text_decoder": whisper_modules.WhisperTextDecoder(model, flavour.DecoderCache, params["max_context_length"]).eval()}
    examples = whisper_modules.example_inputs(model.config, dtype, params["max_prefill_chunk"])
    return export_methods(modules, examples, METHODS), speech_config(model)


def constant_methods(params: dict, sc: dict) -> dict:
    from mlxbuild.families.common import kv_cache_methods  # numpy: not on the planning path

    methods = {
        **kv_cache_methods(params),
        "get_vocab_size": sc["vocab_size"],
        "get_num_mel_bins": sc["num_mel_bins"],
        "get_num_frames": sc["frames"],
        "get_encoder_seq_len": sc["encoder_seq_len"],
        "decoder_start_token_id": sc["decoder_start_ids"][0],
        "get_decoder_start_ids": sc["decoder_start_ids"],
    }
    if sc.get("eos_token_id"):
        methods["get_eos_ids"] = sc["eos_token_id"]
    return methods


def _prompt(start_ids: list[int], n: int, vocab: int, seed: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    fill = torch.randint(0, vocab, (max(n - len(start_ids), 0),), generator=g).tolist()
    return list(start_ids) + fill


def reference(model, params: dict, out: Path) -> dict:
    """The eager model on a synthetic log-mel input: encoder output, then decoder logits
    for the start ids (seeded fill up to `prompt`) and `decode_steps` greedy tokens."""
    import numpy as np
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    from mlxbuild.families import hf, whisper_modules

    dtype = hf.DTYPES[params["dtype"]]
    feats = whisper_modules.synthetic_features(model.config, params["seed"], dtype)
    sc = speech_config(model)
    tokens = _prompt(sc["decoder_start_ids"], params["prompt"], sc["vocab_size"], params["seed"])
    with torch.no_grad():
        hidden = model.get_encoder()(input_features=feats).last_hidden_state
        enc = BaseModelOutput(last_hidden_state=hidden)
        for _ in range(params["decode_steps"]):
            logits = model(encoder_outputs=enc, decoder_input_ids=torch.tensor([tokens]), use_cache=False).logits
            tokens.append(int(logits[0, -1].argmax()))
        logits = model(encoder_outputs=enc, decoder_input_ids=torch.tensor([tokens]), use_cache=False).logits
    np.save(out / "features.npy", feats.float().numpy())
    np.save(out / "encoder.npy", hidden[0].float().numpy())
    np.save(out / "tokens.npy", np.array([tokens], dtype=np.int64))
    np.save(out / "logits.npy", logits[0].float().numpy())
    prompt = max(params["prompt"], len(sc["decoder_start_ids"]))
    # The ASR runner check's eager side: decoding from the one start token an app passes,
    # as far as an app may ask (the decoder's cache).
    runner = asr_runner.runner_reference(model, feats.float().numpy(), params["max_context_length"],
                                         sc["decoder_start_ids"][0], sc["eos_token_id"])
    (out / asr_runner.RUNNER_FILE).write_text(json.dumps(runner))
    return {"model_type": "whisper", "prompt": prompt, "decode_steps": params["decode_steps"],
            "positions": len(tokens), "asr_runner": {"new_tokens": len(runner["tokens"])}}


def decode_rows(program, hidden, tokens, prompt: int):
    """The artifact's logits for every position of `tokens`: prefill `prompt` ids (in
    chunks the program accepts), then one token per call, as a runner feeds it."""
    import numpy as np
    import torch

    from mlxbuild.families.common import as_numpy

    chunk = int(program.constant_methods.get("get_prefill_chunk_size") or prompt)
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).view(1, -1)
    rows, spans = [], [(s, min(s + chunk, prompt)) for s in range(0, prompt, chunk)]
    spans += [(p, p + 1) for p in range(prompt, ids.shape[1])]
    for a, b in spans:
        out = program.run("text_decoder", [ids[:, a:b], hidden, torch.arange(a, b)])[0]
        rows.append(as_numpy(out)[0].astype(np.float32))
    return np.concatenate(rows)


def verify(program, reference_dir: Path, info: dict, tol: dict) -> dict:
    import numpy as np
    import torch

    from mlxbuild.families.common import as_numpy, compare, compare_tensor

    feats = np.load(reference_dir / "features.npy")
    ref_hidden = np.load(reference_dir / "encoder.npy")
    tokens = np.load(reference_dir / "tokens.npy")[0]
    ref = np.load(reference_dir / "logits.npy")
    prompt = info["prompt"]
    hidden = program.run("encoder", [torch.from_numpy(feats).to(input_dtype(program))])[0]
    enc = compare_tensor(as_numpy(hidden)[0].astype(np.float32), ref_hidden, tol)
    got = decode_rows(program, hidden, tokens, prompt)
    result = compare(got, ref, tol)
    result["encoder"] = enc
    if not enc["passed"]:
        result.update(passed=False, reason=f"encoder: {enc['reason']}"
                      + (f"; decoder: {result['reason']}" if result["reason"] else ""))
    if result["passed"] and (reference_dir / asr_runner.RUNNER_FILE).is_file():
        result["asr_runner"] = runner_check(program, feats, reference_dir, float(result.get("max_abs_error") or 0.0))
        if not result["asr_runner"]["passed"]:
            result.update(passed=False, reason=f"ASR runner: {result['asr_runner']['reason']}")
    return result


def runner_check(program, features, reference_dir: Path, max_abs_error: float) -> dict:
    """The artifact as ExecuTorch's ASR runner drives it (``asr_runner.transcribe``, its
    call sequence): from the start token the program names, to its ``get_eos_ids``, as far
    as the eager side decoded; token for token against eager."""
    ref = json.loads((reference_dir / asr_runner.RUNNER_FILE).read_text())
    meta = program.constant_methods
    start = meta.get("decoder_start_token_id", ref["decoder_start_token_id"])
    try:
        got = asr_runner.transcribe(program, features, int(start), [int(t) for t in meta.get("get_eos_ids") or []],
                                    ref["max_new_tokens"], input_dtype(program))
    except Exception as e:  # noqa: BLE001 - where the runner returns an error, the check fails
        return {"passed": False, "reason": f"{type(e).__name__}: {e}"}
    return asr_runner.compare(got, reference_dir, max_abs_error)


def input_dtype(program):
    """The encoder input's dtype, as the program declares it."""
    import torch

    name = program.input_dtype("encoder", 0)
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, torch.float32)


def transcribe(program, features, max_new_tokens: int = 64, stop_at_eos: bool = True) -> dict:
    """Greedy transcription: encode once, prefill the decoder start ids, then one token per
    call until an ``get_eos_ids`` token, ``max_new_tokens`` or the decoder's context."""
    import numpy as np
    import torch

    from mlxbuild.families.decoding import eos_set, greedy_continue

    meta = program.constant_methods
    start = meta.get("get_decoder_start_ids") or [meta.get("decoder_start_token_id", 0)]
    start = [int(t) for t in (start if isinstance(start, list) else [start])]
    limit = int(meta.get("get_max_context_len") or len(start) + max_new_tokens)
    chunk = int(meta.get("get_prefill_chunk_size") or 1)
    eos = eos_set(meta) if stop_at_eos else set()
    for name in METHODS:
        program.reset(name)
    dtype = input_dtype(program)
    feats = torch.as_tensor(np.asarray(features)).to(dtype)
    if feats.dim() == 2:
        feats = feats.unsqueeze(0)
    t0 = time.perf_counter()
    hidden = program.run("encoder", [feats])[0]
    t1 = time.perf_counter()
    logits = None
    for a in range(0, len(start), chunk):
        part = start[a:a + chunk]
        logits = program.run("text_decoder", [torch.tensor([part]), hidden,
                                              torch.arange(a, a + len(part))])[0]
    out, stopped = greedy_continue(
        logits, lambda token, pos: program.run("text_decoder", [torch.tensor([[token]]), hidden,
                                                                torch.tensor([pos])])[0],
        len(start), max_new_tokens, eos, limit)
    t2 = time.perf_counter()
    return {"prompt": start, "tokens": out, "stopped": stopped, "encode_s": t1 - t0, "decode_s": t2 - t1,
            "decode_tokens_per_s": len(out) / (t2 - t1) if out and t2 > t1 else None}


def features(program, args) -> "np.ndarray":
    """[1, n_mels, frames] from --features (.npy), --audio (.wav, through transformers'
    WhisperFeatureExtractor), or a seeded synthetic log-mel input of the encoder's shape."""
    import numpy as np

    from mlxbuild.families import whisper_modules

    meta = program.constant_methods
    n_mels, frames = int(meta.get("get_num_mel_bins", 80)), int(meta.get("get_num_frames", 3000))
    if getattr(args, "features", None) is not None:
        feats = np.load(args.features)
    elif getattr(args, "audio", None):
        feats = whisper_modules.log_mel(args.audio, n_mels, frames)
    else:
        rng = np.random.default_rng(args.seed)
        feats = rng.uniform(-1.0, 1.5, (1, n_mels, frames)).astype(np.float32)
    feats = np.asarray(feats, dtype=np.float32)
    if feats.ndim == 2:
        feats = feats[None]
    if feats.shape != (1, n_mels, frames):
        raise ValueError(f"features of shape {list(feats.shape)}; this encoder takes [1, {n_mels}, {frames}] "
                         f"({n_mels} mel bins x {frames} frames)")
    return feats


def describe(result: dict) -> list[str]:
    rate = "-" if result["decode_tokens_per_s"] is None else f"{result['decode_tokens_per_s']:.1f}"
    lines = [f"decoder start ({len(result['prompt'])}): {' '.join(map(str, result['prompt']))}",
             f"transcription ({len(result['tokens'])} tokens, stopped: {result['stopped']}): "
             f"{' '.join(map(str, result['tokens']))}"]
    if "text" in result:
        lines.append(f"text: {result['text']}")
    lines.append(f"encoder {result['encode_s'] * 1000:.1f} ms, decode {rate} tok/s")
    return lines
