"""The runner check of Parakeet TDT artifacts. ExecuTorch's Parakeet example
(``examples/models/parakeet``: ``main.cpp``, ``parakeet_transcriber.cpp``, ``decode.h``; the
same loop is ``TransducerRunner::transcribe`` in ``extension/asr/runner``) has no Python
binding, so ``transcribe`` follows its greedy TDT decode call for call:

- ``encoder`` runs once on ``(mel, [mel_len])`` (int64 length) and returns
  ``(f_proj[1, T', H], encoded_len)``; the example passes its in-program preprocessor's output
  as is, and the check passes features in the dtype the encoder declares;
- the LSTM state ``h``, ``c`` starts as zeros ``[num_rnn_layers, 1, pred_hidden]`` in the
  dtypes ``decoder_step`` declares for its inputs 1 and 2;
- ``decoder_step`` is primed once with the SOS token, which is ``blank_id``: ``[[blank_id]]``
  (int64), ``h``, ``c`` -> ``(g_proj, h, c)``;
- then, while ``t < encoded_len``: ``joint(f_proj[:, t:t+1, :], g_proj)`` -> ``(token,
  duration_index)`` (int64 scalars); the duration is ``(0, 1, 2, 3, 4)[duration_index]`` (a
  table in the runner's source, not read from the program); a blank moves ``t`` on by
  ``max(duration, 1)``; any other token is emitted, fed to ``decoder_step`` (``[[token]]``,
  ``h``, ``c``) and ``t`` moves on by the duration; after ``max_symbols_per_step`` (a literal
  10) zero-duration tokens in a row on one frame, ``t`` moves on by one more.
- It stops when the frames run out: there is no token budget.

The runner reads ``num_rnn_layers``, ``pred_hidden`` and ``blank_id`` for that loop. The
example app also loads a ``preprocessor`` method (waveform to mel) from the same program and
reads ``vocab_size``, ``sample_rate``, ``window_stride``, ``encoder_subsampling_factor``; the
check starts from features at the encoder, and ``example_gaps`` names those an artifact lacks.

The runner copies tensors between calls as raw bytes typed by the declared input dtypes, so
where a method's output dtype (or size) differs from the input it is copied into, the runner
would misread memory; ``transcribe`` raises ValueError there, as where the runner errors.

The eager side (``runner_reference``) decodes the quantized transformers model with the same
decision rule, keeping the top-two margin of every token and duration choice; ``compare``
walks the two sequences of joint decisions with the text runner check's near-tie rule.
"""

from __future__ import annotations

import json
from pathlib import Path

RUNNER_FILE = "tdt_runner.json"
ENCODER, DECODER_STEP, JOINT = "encoder", "decoder_step", "joint"
METHODS = (ENCODER, DECODER_STEP, JOINT)
# The runner's duration table and max-symbols literal (decode.h / parakeet_transcriber.cpp).
DURATIONS = (0, 1, 2, 3, 4)
MAX_SYMBOLS_PER_STEP = 10
# The constant methods the decode loop reads, in the order the transcriber reads them.
CONSTANTS = ("num_rnn_layers", "pred_hidden", "blank_id")
# What the example app loads besides (it fails to start without them).
EXAMPLE_METHODS = ("preprocessor",)
EXAMPLE_CONSTANTS = ("vocab_size", "sample_rate", "window_stride", "encoder_subsampling_factor")


def example_gaps(program) -> dict:
    """The methods and constants ExecuTorch's Parakeet example app loads that the program lacks."""
    methods = [m for m in EXAMPLE_METHODS if m not in set(program.method_names)]
    constants = [c for c in EXAMPLE_CONSTANTS if c not in program.constant_methods]
    return {k: v for k, v in (("methods", methods), ("constants", constants)) if v}


def _torch(x):
    import numpy as np
    import torch

    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def _declared(program, method: str, index: int):
    """``get_input_scalar_type``: the dtype a method declares for an input, as a torch dtype."""
    import torch

    try:
        name = program.input_dtype(method, index)
    except (IndexError, KeyError) as e:
        raise ValueError(f"Method {method} has no input {index}") from e
    if name is None or not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"Failed to get input tensor metadata for {method}[{index}]")
    return getattr(torch, name)


def _copied(out, dtype, numel: int, what: str):
    """An output the runner memcpy's into a buffer typed ``dtype`` of ``numel`` elements."""
    out = _torch(out)
    if out.dtype != dtype:
        raise ValueError(f"{what} is {str(out.dtype).removeprefix('torch.')}, but the runner copies its bytes "
                         f"into a {str(dtype).removeprefix('torch.')} input")
    if out.numel() != numel:
        raise ValueError(f"{what} has {out.numel()} elements, the runner copies {numel}")
    return out.contiguous()


def _index(out, what: str) -> int:
    """An int64 scalar the runner reads with ``const_data_ptr<int64_t>()[0]``."""
    import torch

    out = _torch(out)
    if out.dtype != torch.int64 or out.numel() < 1:
        raise ValueError(f"{what} is {out.dtype} of {out.numel()} elements; the runner reads an int64")
    return int(out.reshape(-1)[0])


def transcribe(program, features, durations=DURATIONS, max_symbols_per_step: int = MAX_SYMBOLS_PER_STEP) -> dict:
    """The example's greedy TDT decode on an opened program, from features at the encoder
    (``[1, T, n_mels]``, the layout this family's encoder takes). Returns the emitted
    tokens with their frames and durations, every joint decision (``steps``: frame,
    token, duration index) and the number of calls per method. Raises ValueError where
    the runner would error or misread memory."""
    import numpy as np
    import torch

    names = set(program.method_names)
    for name in METHODS:  # the transcriber's load_method, in its order
        if name not in names:
            raise ValueError(f"Failed to load method: {name}")
    meta = program.constant_methods
    for name in CONSTANTS:
        if name not in meta:
            raise ValueError(f"Failed to query model metadata method: {name}")
    layers, hidden, blank = (int(meta[n]) for n in CONSTANTS)
    for name in METHODS:
        program.reset(name)
    calls = dict.fromkeys(METHODS, 0)

    def run(method, inputs, expected, failed):
        calls[method] += 1
        outputs = program.run(method, inputs)
        if len(outputs) < expected:
            raise ValueError(f"{failed}: {method} returned {len(outputs)} outputs, the runner reads {expected}")
        return outputs

    # The example feeds its in-program preprocessor's mel as is; these artifacts have none, so
    # the features come in the dtype the encoder declares (what such a preprocessor must give).
    feats = _torch(features if isinstance(features, torch.Tensor) else np.asarray(features, dtype=np.float32))
    feats = feats.to(_declared(program, ENCODER, 0))
    outputs = run(ENCODER, [feats, torch.tensor([feats.shape[1]], dtype=torch.long)], 2, "Encoder forward failed")
    f_proj, frames = _torch(outputs[0]), _index(outputs[1], "encoded_len")
    if f_proj.dim() != 3 or f_proj.shape[0] != 1:
        raise ValueError(f"encoder output of shape {list(f_proj.shape)}; the runner reads [1, T, joint_hidden]")
    if frames > f_proj.shape[1]:
        raise ValueError(f"encoded_len {frames} exceeds the encoder output's {f_proj.shape[1]} frames "
                         "(the runner would read past it)")
    proj_dim, state = int(f_proj.shape[2]), layers * hidden

    h_dtype, c_dtype = _declared(program, DECODER_STEP, 1), _declared(program, DECODER_STEP, 2)
    h = torch.zeros(layers, 1, hidden, dtype=h_dtype)
    c = torch.zeros(layers, 1, hidden, dtype=c_dtype)
    outputs = run(DECODER_STEP, [torch.tensor([[blank]], dtype=torch.long), h, c], 3, "decoder_step (SOS) failed")
    h = _copied(outputs[1], h_dtype, state, "decoder_step's h")
    c = _copied(outputs[2], c_dtype, state, "decoder_step's c")
    f_dtype, g_dtype = _declared(program, JOINT, 0), _declared(program, JOINT, 1)
    if f_proj.dtype != f_dtype:
        raise ValueError(f"encoder's f_proj is {str(f_proj.dtype).removeprefix('torch.')}, but the runner copies "
                         f"its bytes into joint's {str(f_dtype).removeprefix('torch.')} input")
    g = _copied(outputs[0], g_dtype, proj_dim, "decoder_step's g_proj").reshape(1, 1, proj_dim)

    tokens, stamps, lengths, steps = [], [], [], []
    t, on_frame, forced = 0, 0, 0
    while t < frames:
        outputs = run(JOINT, [f_proj[:, t:t + 1, :].contiguous(), g], 2, f"joint failed at t={t}")
        k, d = _index(outputs[0], "joint's token"), _index(outputs[1], "joint's duration index")
        if not 0 <= d < len(durations):
            raise ValueError(f"joint's duration index {d} is outside the runner's table {list(durations)}")
        steps.append([t, k, d])
        dur = int(durations[d])
        if k == blank:
            t, on_frame = t + max(dur, 1), 0
            continue
        tokens.append(k), stamps.append(t), lengths.append(dur)
        outputs = run(DECODER_STEP, [torch.tensor([[k]], dtype=torch.long), h, c], 3, "decoder_step failed")
        h = _copied(outputs[1], h_dtype, state, "decoder_step's h")
        c = _copied(outputs[2], c_dtype, state, "decoder_step's c")
        g = _copied(outputs[0], g_dtype, proj_dim, "decoder_step's g_proj").reshape(1, 1, proj_dim)
        t += dur
        if dur == 0:
            on_frame += 1
            if on_frame >= max_symbols_per_step:
                t, on_frame, forced = t + 1, 0, forced + 1
        else:
            on_frame = 0
    return {"tokens": tokens, "frames": stamps, "durations": lengths, "steps": steps, "encoder_frames": frames,
            "forced_advances": forced, "calls": calls, "durations_table": [int(x) for x in durations],
            "max_symbols_per_step": int(max_symbols_per_step)}


def runner_reference(model, features, durations=None, max_symbols_per_step=None) -> dict:
    """Eager greedy TDT decoding of a transformers ``ParakeetForTDT`` with the runner's
    decision rule (a leaf: the family passes the model's durations and max symbols per step;
    by default the model config's). Keeps the top-two margin of each token and duration choice."""
    import numpy as np
    import torch

    cfg, dec = model.config, model.decoder
    blank, vocab = int(cfg.blank_token_id), int(cfg.vocab_size)
    durations = [int(d) for d in (cfg.durations if durations is None else durations)]
    max_symbols = int(cfg.max_symbols_per_step if max_symbols_per_step is None else max_symbols_per_step)

    def margin(logits) -> float:
        if logits.numel() < 2:
            return float("inf")
        top = torch.topk(logits, 2).values
        return float(top[0] - top[1])

    def step(token, h, c):  # the exported decoder_step, on the eager modules
        out, (h, c) = dec.lstm(dec.embedding(torch.tensor([[token]])), (h, c))
        return dec.decoder_projector(out), h, c

    feats = features if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features))
    with torch.no_grad():
        feats = feats.to(next(model.parameters()).dtype)
        f = model.get_audio_features(input_features=feats).pooler_output                       # [1, T', H]
        frames = int(model.encoder._get_subsampling_output_length(torch.tensor([feats.shape[1]]))[0])
        zeros = torch.zeros(cfg.num_decoder_layers, 1, cfg.decoder_hidden_size, dtype=f.dtype)
        g, h, c = step(blank, zeros, zeros)
        tokens, stamps, steps, token_margins, duration_margins = [], [], [], [], []
        t, on_frame = 0, 0
        while t < frames:
            logits = model.joint(decoder_hidden_states=g, encoder_hidden_states=f[:, t:t + 1]).reshape(-1).float()
            k, d = int(logits[:vocab].argmax()), int(logits[vocab:].argmax())
            steps.append([t, k, d])
            token_margins.append(margin(logits[:vocab])), duration_margins.append(margin(logits[vocab:]))
            dur = durations[d]
            if k == blank:
                t, on_frame = t + max(dur, 1), 0
                continue
            tokens.append(k), stamps.append(t)
            g, h, c = step(k, h, c)
            t += dur
            if dur == 0:
                on_frame += 1
                if on_frame >= max_symbols:
                    t, on_frame = t + 1, 0
            else:
                on_frame = 0
    return {"blank_id": blank, "durations": durations, "max_symbols_per_step": max_symbols, "encoder_frames": frames,
            "tokens": tokens, "frames": stamps, "steps": steps, "token_margins": token_margins,
            "duration_margins": duration_margins}


def compare(got: dict, reference_dir: Path, max_abs_error: float) -> dict:
    """The runner loop's joint decisions (``transcribe``'s) against eager's, with the text
    runner check's near-tie rule: they may part only where eager's choice there (of token,
    or of duration) had a top-two margin within ``2 x max_abs_error``; the rest is then not
    compared."""
    ref = json.loads((Path(reference_dir) / RUNNER_FILE).read_text())
    want = ref["steps"]
    figures = {"blank_id": ref["blank_id"], "durations": ref["durations"], "encoder_frames": got["encoder_frames"],
               "joint_calls": len(got["steps"]), "new_tokens": len(got["tokens"]),
               "expected_new_tokens": len(ref["tokens"])}
    if list(got["durations_table"]) != list(ref["durations"]):
        return {**figures, "passed": False, "matched": 0,
                "reason": f"the runner's duration table {list(got['durations_table'])} is not the model's "
                          f"durations {ref['durations']}"}
    if got["encoder_frames"] != ref["encoder_frames"]:
        return {**figures, "passed": False, "matched": 0,
                "reason": f"encoded_len {got['encoder_frames']}, eager has {ref['encoder_frames']} encoder frames"}
    for i, (a, b) in enumerate(zip(got["steps"], want)):
        if a == b:
            continue
        matched = sum(1 for s in want[:i] if s[1] != ref["blank_id"])
        if a[0] != b[0]:
            return {**figures, "passed": False, "matched": matched,
                    "reason": f"the TDT runner's joint call {i} is at frame {a[0]}, eager greedy's at {b[0]}"}
        what, margin = (("token", ref["token_margins"][i]) if a[1] != b[1]
                        else ("duration index", ref["duration_margins"][i]))
        x, y = (a[1], b[1]) if what == "token" else (a[2], b[2])
        if margin <= 2 * max_abs_error:
            return {**figures, "passed": True, "matched": matched,
                    "note": f"parted from eager at joint call {i} (frame {b[0]}, token {matched} of "
                            f"{len(ref['tokens'])}), a near tie of the {what} (margin {margin:.3g} <= 2 x "
                            f"{max_abs_error:.3g})"}
        return {**figures, "passed": False, "matched": matched,
                "reason": f"the TDT runner's joint call {i} (frame {b[0]}) gives {what} {x}, eager greedy gives {y} "
                          f"(a decisive choice: margin {margin:.3g})"}
    if len(got["steps"]) != len(want) or got["tokens"] != ref["tokens"]:
        return {**figures, "passed": False, "matched": min(len(got["tokens"]), len(ref["tokens"])),
                "reason": f"the TDT runner made {len(got['steps'])} joint calls and emitted {len(got['tokens'])} "
                          f"tokens, eager greedy {len(want)} and {len(ref['tokens'])}"}
    return {**figures, "passed": True, "matched": len(ref["tokens"])}
