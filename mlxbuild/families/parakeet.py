"""Parakeet TDT (speech-to-text, token-and-duration transducer): three methods of one
program, named and shaped as ExecuTorch's transducer runner
(``extension/asr/runner/transducer_runner``) calls them,

- ``encoder(input_features[1, T, n_mels], length[1]) -> (f_proj[1, T', H], encoded_len[1])``
  (T dynamic; T' = T subsampled by the encoder's factor);
- ``decoder_step(token[1, 1], h[L, 1, P], c[L, 1, P]) -> (g_proj[1, 1, H], h, c)``
  (the LSTM prediction network; the runner threads its state);
- ``joint(f[1, 1, H], g[1, 1, H]) -> (token_id, duration_idx)``,

plus the constants the runner reads (``blank_id``, ``num_rnn_layers``, ``pred_hidden``) and
``get_durations``, ``get_vocab_size``, ``get_num_mel_bins``, ``get_subsampling_factor``.

Verification: the three methods on a seeded input against the eager model (encoder and
prediction-network outputs, the joint's token and duration choices on every frame and step),
then the artifact as ExecuTorch's Parakeet example drives it (``tdt_runner``), token for token
against eager greedy decoding.

Only the MLX flavour is built: the encoder exports with a dynamic time dimension only in
non-strict mode, and the portable / XNNPACK lowering of that program fails (measured:
``KeyError: 'm.encoder.encode_positions.inv_freq'`` in ExecuTorch 1.5.1's edge passes).
"""

from __future__ import annotations

import json
from pathlib import Path

from mlxbuild.families import tdt_runner

NAME = "parakeet"
METHODS = ("encoder", "decoder_step", "joint")
# Input frames of the verification input (80 ms per encoder frame at subsampling 8).
VERIFY_FRAMES = 160


def _modules(model):
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_features, length):
            f = self.m.get_audio_features(input_features=input_features).pooler_output
            return f, self.m.encoder._get_subsampling_output_length(length).to(torch.long)

    class DecoderStep(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.d = m.decoder

        def forward(self, token, h, c):
            out, (h, c) = self.d.lstm(self.d.embedding(token), (h, c))
            return self.d.decoder_projector(out), h, c

    class Joint(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.j, self.vocab = m.joint, m.config.vocab_size

        def forward(self, f, g):
            logits = self.j(decoder_hidden_states=g, encoder_hidden_states=f).reshape(-1)
            return logits[: self.vocab].argmax(), logits[self.vocab:].argmax()

    return {"encoder": Encoder(model).eval(), "decoder_step": DecoderStep(model).eval(),
            "joint": Joint(model).eval()}


def speech_config(model) -> dict:
    cfg = model.config
    return {"model_type": cfg.model_type, "vocab_size": cfg.vocab_size, "blank_id": cfg.blank_token_id,
            "num_mel_bins": cfg.encoder_config.num_mel_bins, "durations": list(cfg.durations),
            "num_rnn_layers": cfg.num_decoder_layers, "pred_hidden": cfg.decoder_hidden_size,
            "subsampling_factor": cfg.encoder_config.subsampling_factor,
            "max_symbols_per_step": cfg.max_symbols_per_step}


def _state(sc: dict, dtype):
    import torch

    return torch.zeros(sc["num_rnn_layers"], 1, sc["pred_hidden"], dtype=dtype)


def export(model, params: dict, flavour):
    import torch

    from mlxbuild import progress
    from mlxbuild.errors import BuildError
    from mlxbuild.families import flavours_of_model_type, hf

    if flavour.NAME not in flavours_of_model_type(model.config.model_type):
        raise BuildError(f"parakeet: the {flavour.NAME!r} export flavour is not supported (only mlx): the "
                         "portable/XNNPACK lowering of the dynamic-length encoder fails in ExecuTorch 1.5.1")
    dtype, sc = hf.DTYPES[params["dtype"]], speech_config(model)
    mods, hidden = _modules(model), model.config.decoder_hidden_size
    feats = torch.zeros(1, VERIFY_FRAMES, sc["num_mel_bins"], dtype=dtype)
    programs = {}
    with torch.no_grad():
        progress.note("torch.export encoder (dynamic frames)")
        # Strict tracing turns the subsampling's length arithmetic into guards no range
        # satisfies; non-strict with an automatic dim keeps T dynamic (as ExecuTorch's own
        # Parakeet export does).
        programs["encoder"] = torch.export.export(
            mods["encoder"], (feats, torch.tensor([VERIFY_FRAMES])),
            dynamic_shapes={"input_features": {1: torch.export.Dim.AUTO}, "length": None}, strict=False)
        progress.note("torch.export decoder_step, joint")
        programs["decoder_step"] = torch.export.export(
            mods["decoder_step"], (torch.tensor([[sc["blank_id"]]]), _state(sc, dtype), _state(sc, dtype)),
            strict=True)
        # Two distinct example tensors: one tensor passed twice would be traced as one input.
        f, g = torch.zeros(1, 1, hidden, dtype=dtype), torch.zeros(1, 1, hidden, dtype=dtype)
        programs["joint"] = torch.export.export(mods["joint"], (f, g), strict=True)
    return programs, sc


def constant_methods(params: dict, sc: dict) -> dict:
    return {"blank_id": sc["blank_id"], "num_rnn_layers": sc["num_rnn_layers"], "pred_hidden": sc["pred_hidden"],
            "get_durations": sc["durations"], "get_vocab_size": sc["vocab_size"],
            "get_num_mel_bins": sc["num_mel_bins"], "get_subsampling_factor": sc["subsampling_factor"],
            "get_max_symbols_per_step": sc["max_symbols_per_step"]}


def synthetic_features(n_mels: int, frames: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, frames, n_mels, generator=g)


def reference(model, params: dict, out: Path) -> dict:
    """The eager model on a seeded input: the projected encoder output, the prediction
    network's outputs along blank + `decode_steps` seeded tokens, and the joint network's
    token and duration logits for every (encoder frame, decoder step) pair."""
    import numpy as np
    import torch

    from mlxbuild.families import hf

    sc, dtype = speech_config(model), hf.DTYPES[params["dtype"]]
    feats = synthetic_features(sc["num_mel_bins"], VERIFY_FRAMES, params["seed"]).to(dtype)
    g = torch.Generator().manual_seed(params["seed"])
    tokens = [sc["blank_id"]] + torch.randint(0, sc["blank_id"], (params["decode_steps"],), generator=g).tolist()
    with torch.no_grad():
        f = model.get_audio_features(input_features=feats).pooler_output                  # [1, T', H]
        dec = model.decoder
        lstm, _ = dec.lstm(dec.embedding(torch.tensor([tokens])),
                           (_state(sc, dtype), _state(sc, dtype)))
        gs = dec.decoder_projector(lstm)                                                      # [1, S, H]
        joint = model.joint(decoder_hidden_states=gs[:, None], encoder_hidden_states=f[:, :, None])  # [1, T', S, V+D]
    np.save(out / "features.npy", feats.float().numpy())
    np.save(out / "encoder.npy", f[0].float().numpy())
    np.save(out / "tokens.npy", np.array(tokens, dtype=np.int64))
    np.save(out / "decoder.npy", gs[0].float().numpy())
    np.save(out / "joint.npy", joint[0].float().numpy())
    # The TDT runner check's eager side: greedy decoding of the same input to its last frame,
    # with the model's own durations and max symbols per step.
    runner = tdt_runner.runner_reference(model, feats, sc["durations"], sc["max_symbols_per_step"])
    (out / tdt_runner.RUNNER_FILE).write_text(json.dumps(runner))
    return {"model_type": sc["model_type"], "frames": VERIFY_FRAMES, "vocab_size": sc["vocab_size"],
            "positions": int(joint.shape[1] * joint.shape[2]), "tdt_runner": {"new_tokens": len(runner["tokens"])}}


def _argmax_agreement(got, logits, tol: dict) -> dict:
    """Indices from the artifact against the reference's argmax, where its winner is clear."""
    import numpy as np

    srt = np.sort(logits, axis=-1)
    margin = tol["max_rel_error"] * (float(np.abs(logits).max()) or 1.0) * 10
    decisive = (srt[..., -1] - srt[..., -2]) > margin
    agree = got == logits.argmax(-1)
    return {"agreement": float(agree.mean()),
            "agreement_decisive": float(agree[decisive].mean()) if decisive.any() else 1.0}


def verify(program, reference_dir: Path, info: dict, tol: dict) -> dict:
    import numpy as np
    import torch

    from mlxbuild.families.common import as_numpy, compare_tensor

    ref = {k: np.load(reference_dir / f"{k}.npy") for k in ("features", "encoder", "tokens", "decoder", "joint")}
    vocab = info["vocab_size"]
    meta = program.constant_methods
    feats = torch.from_numpy(ref["features"])
    f, n = program.run("encoder", [feats, torch.tensor([feats.shape[1]])])
    h = c = torch.zeros(meta["num_rnn_layers"], 1, meta["pred_hidden"])
    gs = []
    for tok in ref["tokens"]:
        g, h, c = program.run("decoder_step", [torch.tensor([[int(tok)]]), h, c])
        gs.append(as_numpy(g)[0, 0])
    tokens, durations = [], []
    f_t = torch.as_tensor(f)
    for t in range(f_t.shape[1]):
        row_k, row_d = [], []
        for s in range(len(gs)):
            k, d = program.run("joint", [f_t[:, t:t + 1], torch.from_numpy(gs[s][None, None])])
            row_k.append(int(as_numpy(k))), row_d.append(int(as_numpy(d)))
        tokens.append(row_k), durations.append(row_d)
    enc = compare_tensor(as_numpy(f)[0].astype(np.float32), ref["encoder"], tol)
    dec = compare_tensor(np.stack(gs).astype(np.float32), ref["decoder"], tol)
    tok = _argmax_agreement(np.array(tokens), ref["joint"][..., :vocab], tol)
    dur = _argmax_agreement(np.array(durations), ref["joint"][..., vocab:], tol)
    length_ok = int(as_numpy(n)[0]) == ref["encoder"].shape[0]
    problems = [f"encoder: {enc['reason']}"] if not enc["passed"] else []
    problems += [f"decoder_step: {dec['reason']}"] if not dec["passed"] else []
    if not length_ok:
        problems.append(f"encoded_len {int(as_numpy(n)[0])} != {ref['encoder'].shape[0]} frames")
    for name, agreement in (("joint tokens", tok), ("joint durations", dur)):
        if agreement["agreement_decisive"] < tol["min_top1_agreement"]:
            problems.append(f"{name}: argmax agreement {agreement['agreement_decisive']:.2%} where decisive")
    result = {"passed": not problems, "executed": True, "reason": "; ".join(problems), "encoder": enc,
              "decoder_step": dec, "joint_tokens": tok, "joint_durations": dur,
              "max_rel_error": max(enc["max_rel_error"], dec["max_rel_error"]),
              "max_abs_error": max(enc["max_abs_error"], dec["max_abs_error"]),
              "positions": int(ref["joint"].shape[0] * ref["joint"].shape[1]), "tolerance": tol}
    if result["passed"] and (reference_dir / tdt_runner.RUNNER_FILE).is_file():
        # The joint returns indices only, so its logit error is not measured: a near tie is
        # one within twice the error the tolerance allows on the eager joint logits.
        allowed = tol["max_rel_error"] * (float(np.abs(ref["joint"]).max()) or 1.0)
        result["tdt_runner"] = runner_check(program, ref["features"], reference_dir, allowed)
        if not result["tdt_runner"]["passed"]:
            result.update(passed=False, reason=f"TDT runner: {result['tdt_runner']['reason']}")
    return result


def runner_check(program, features, reference_dir: Path, max_abs_error: float) -> dict:
    """The artifact as ExecuTorch's Parakeet example drives it (``tdt_runner.transcribe``, its
    call sequence, from features at the encoder to the last encoder frame); its joint decisions
    against eager greedy decoding's. Notes what the example app loads that the program lacks."""
    try:
        got = tdt_runner.transcribe(program, features)
    except Exception as e:  # noqa: BLE001 - where the runner returns an error, the check fails
        return {"passed": False, "reason": f"{type(e).__name__}: {e}"}
    result = tdt_runner.compare(got, reference_dir, max_abs_error)
    result.update(calls=got["calls"], forced_advances=got["forced_advances"],
                  blank_steps=sum(1 for s in got["steps"] if s[1] == int(program.constant_methods["blank_id"])))
    gaps = tdt_runner.example_gaps(program)
    if gaps:
        result["example_app_needs"] = gaps
    return result


def transcribe(program, features, max_new_tokens: int = 64, stop_at_eos: bool = True) -> dict:
    """Greedy TDT decoding as transformers' ``ParakeetForTDT.generate`` does it: the joint
    picks a token and a duration for the current encoder frame; a token other than blank
    is emitted and fed to the prediction network; the frame pointer moves by the duration
    (at least one frame after a blank). Stops when the frames run out, after
    ``max_new_tokens`` emitted tokens, or after ``get_max_symbols_per_step`` tokens at one frame."""
    import time

    import numpy as np
    import torch

    from mlxbuild.families.common import as_numpy

    meta = program.constant_methods
    blank, durations = int(meta["blank_id"]), [int(d) for d in meta["get_durations"]]
    max_symbols = int(meta.get("get_max_symbols_per_step") or 10)
    feats = torch.as_tensor(np.asarray(features, dtype=np.float32))
    if feats.dim() == 2:
        feats = feats.unsqueeze(0)
    for name in METHODS:
        program.reset(name)
    t0 = time.perf_counter()
    f, n = program.run("encoder", [feats, torch.tensor([feats.shape[1]])])
    t1 = time.perf_counter()
    f, frames = torch.as_tensor(f), int(as_numpy(n)[0])
    h = c = torch.zeros(int(meta["num_rnn_layers"]), 1, int(meta["pred_hidden"]))
    g, h, c = program.run("decoder_step", [torch.tensor([[blank]]), h, c])
    out, stamps, t, at_frame, forced, stopped = [], [], 0, 0, 0, "frames"
    while t < frames:
        k, d = program.run("joint", [f[:, t:t + 1], g])
        k, dur = int(as_numpy(k)), durations[int(as_numpy(d))]
        if k == blank:
            t, at_frame = t + max(dur, 1), 0
            continue
        out.append(k), stamps.append(t)
        if len(out) >= max_new_tokens:
            stopped = "max_new_tokens"
            break
        g, h, c = program.run("decoder_step", [torch.tensor([[k]]), h, c])
        at_frame = at_frame + 1 if dur == 0 else 0
        if at_frame >= max_symbols:  # the same frame keeps emitting: move on (as NeMo and ExecuTorch do)
            dur, at_frame, forced = 1, 0, forced + 1
        t += dur
    t2 = time.perf_counter()
    return {"tokens": out, "frames": stamps, "stopped": stopped, "encoder_frames": frames,
            "forced_advances": forced,
            "encode_s": t1 - t0, "decode_s": t2 - t1,
            "decode_tokens_per_s": len(out) / (t2 - t1) if out and t2 > t1 else None}


def features(program, args):
    """[1, T, n_mels] from --features (.npy), --audio (.wav, through transformers'
    ParakeetFeatureExtractor with its default 16 kHz / 10 ms settings), or a seeded synthetic
    input of VERIFY_FRAMES frames."""
    import numpy as np

    n_mels = int(program.constant_methods.get("get_num_mel_bins", 80))
    if getattr(args, "audio", None):
        from transformers import ParakeetFeatureExtractor

        from mlxbuild.families import whisper_modules

        fe = ParakeetFeatureExtractor(feature_size=n_mels)
        feats = fe(whisper_modules.read_wav(args.audio), sampling_rate=whisper_modules.SAMPLE_RATE,
                   return_tensors="np").input_features
    elif getattr(args, "features", None) is not None:
        feats = np.asarray(np.load(args.features), dtype=np.float32)
    else:
        feats = synthetic_features(n_mels, VERIFY_FRAMES, args.seed).numpy()
    if feats.ndim == 2:
        feats = feats[None]
    if feats.ndim != 3 or feats.shape[0] != 1 or feats.shape[2] != n_mels:
        raise ValueError(f"features of shape {list(feats.shape)}; this encoder takes [1, T, {n_mels}]")
    return feats


def describe(result: dict) -> list[str]:
    rate = "-" if result["decode_tokens_per_s"] is None else f"{result['decode_tokens_per_s']:.1f}"
    return [f"transcription ({len(result['tokens'])} tokens over {result['encoder_frames']} encoder frames, "
            f"stopped: {result['stopped']}): {' '.join(map(str, result['tokens']))}",
            *([f"text: {result['text']}"] if "text" in result else []),
            f"encoder {result['encode_s'] * 1000:.1f} ms, decode {rate} tok/s"]
