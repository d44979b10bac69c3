"""multimodal-text-to-text: encoders feeding one text decoder, in the layout ExecuTorch's
``MultimodalRunner`` (``extension/llm/runner/multimodal_runner``) loads,

- an encoder per modality: ``audio_encoder(features[B, n_mels, frames]) -> embeds[1, T, D]``
  (and ``vision_encoder`` for images);
- ``token_embedding(token_ids[1, T]) -> embeds[1, T, D]``;
- ``text_decoder(input_embeds[1, T, D], cache_position[T]) -> logits[1, T, V]`` over the
  flavour's KV cache;

plus the LLM runner's constant methods. The runner takes a list of inputs (text, audio,
image) and prefills each with one ``text_decoder`` call on its embeddings, then decodes
greedily through ``token_embedding``; verification and ``mlxbuild run`` drive the artifact
the same way (``drive``), so an encoder's output must fit one prefill call.

The family is chosen by the checkpoint's ``model_type`` when building and by the program's
encoder method when running. A family module provides ``NAME``, ``ENCODER`` (its encoder
method), ``export(model, params, flavour) -> (programs, family config)``,
``constant_methods(params, config)``, ``reference_inputs(model, params)`` (the eager model's
segments and prompt ids), ``eager_generate(model, inputs, new_tokens)``,
``eager_logits(model, inputs, ids)`` and ``media(program, args)`` (the encoder input of
``mlxbuild run``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlxbuild.families import family_of, llava, voxtral

NAME = "multimodal-text-to-text"
FAMILIES = (voxtral, llava)
METHODS = ("token_embedding", "text_decoder")
ENCODERS = ("audio_encoder", "vision_encoder")
USES_FLAVOUR_ATTENTION = True
VERIFY_SUFFIX = 3  # text tokens after the media in the verification prompt
VERIFY_DECODE_STEPS = 8
RUNNER_TEXT = 6  # tokens of corpus text after the media in the runner check's prompt
RUNNER_NEW_TOKENS = 8
RUNNER_FILE = "multimodal_runner.json"
RUNNER = "multimodal"  # the verify stage runs ExecuTorch's MultimodalRunner, not TextLLMRunner


def verify_spec(max_context_length: int, max_prefill_chunk: int) -> dict:
    return {"prompt": VERIFY_SUFFIX, "decode_steps": VERIFY_DECODE_STEPS, "seed": 0,
            "runner_prompt": min(RUNNER_TEXT, max_prefill_chunk)}


def family(model_type: str):
    return family_of(NAME, FAMILIES, model_type)


def family_of_program(method_names):
    names = set(method_names)
    for fam in FAMILIES:
        if fam.ENCODER in names:
            return fam
    raise ValueError(f"no {NAME} family has the methods {sorted(names)}")


def export(model, params: dict, flavour):
    programs, config = family(model.config.model_type).export(model, params, flavour)
    return programs, {"multimodal_config": config}


def constant_methods(params: dict, info: dict) -> dict:
    config = info["multimodal_config"]
    return family(config["model_type"]).constant_methods(params, config)


# --------------------------------------------------------------------------- driving


def drive(program, segments, new_tokens: int, eos=(), forced=None, keep_logits=False) -> dict:
    """The artifact as ExecuTorch's MultimodalRunner drives it: each segment (``("text",
    ids)`` or ``(encoder method, input tensor)``) prefilled with one ``text_decoder`` call on
    its embeddings; then greedy decoding, a ``token_embedding`` + ``text_decoder`` call per
    token, until ``new_tokens``, an ``eos`` token or the context. ``forced``: feed these
    tokens instead of the artifact's own choices (teacher forcing, for the logit rows)."""
    import numpy as np
    import torch

    from mlxbuild.families.common import as_numpy

    meta = program.constant_methods
    limit = int(meta.get("get_max_context_len") or meta.get("get_max_seq_len"))
    for name in program.method_names:
        program.reset(name)
    pos, rows, lengths, logits = 0, [], [], None
    t0 = time.perf_counter()
    for kind, value in segments:
        if kind == "text":
            emb = program.run("token_embedding", [torch.tensor([list(value)], dtype=torch.long)])[0]
        else:
            emb = program.run(kind, [value])[0]
        n = int(emb.shape[1])
        if pos + n > limit:
            raise ValueError(f"the prompt takes {pos + n} positions; the decoder's context is {limit}")
        logits = program.run("text_decoder", [emb, torch.arange(pos, pos + n)])[0]
        if keep_logits:
            rows.append(as_numpy(logits)[0].astype(np.float32))
        lengths.append(n)
        pos += n
    t1 = time.perf_counter()
    out, stopped = [], "max_new_tokens"
    while len(out) < new_tokens:
        token = int(logits[0, -1].float().argmax())
        out.append(token)
        if token in eos:
            stopped = "eos"
            break
        if pos >= limit:
            stopped = "context"
            break
        feed = forced[len(out) - 1] if forced is not None else token
        emb = program.run("token_embedding", [torch.tensor([[feed]], dtype=torch.long)])[0]
        logits = program.run("text_decoder", [emb, torch.tensor([pos])])[0]
        if keep_logits:
            rows.append(as_numpy(logits)[0].astype(np.float32))
        pos += 1
    t2 = time.perf_counter()
    return {"tokens": out, "stopped": stopped, "segments": lengths, "prefill_s": t1 - t0, "decode_s": t2 - t1,
            "rows": rows}


# --------------------------------------------------------------------------- build steps


def reference(model, params: dict, out: Path) -> dict:
    """transformers' own model on a seeded input: ``generate`` from the family's prompt
    (media placeholders expanded), and the logits of every position along it."""
    import numpy as np
    import torch

    fam = family(model.config.model_type)
    inputs = fam.reference_inputs(model, params)
    ids = fam.eager_generate(model, inputs, params["decode_steps"])
    logits = fam.eager_logits(model, inputs, ids)
    media = inputs["media"]
    np.save(out / "media.npy", (media if media.dtype == torch.uint8 else media.float()).numpy())
    np.save(out / "tokens.npy", np.array(ids, dtype=np.int64))
    np.save(out / "logits.npy", logits.float().numpy())
    (out / "segments.json").write_text(json.dumps(inputs["segments"]))
    return {"model_type": fam.NAME, "prompt": len(inputs["prompt_ids"]), "decode_steps": params["decode_steps"],
            "positions": len(ids)}


def _segments(spec, media, dtype):
    """The reference's segments with the media tensor in place."""
    import torch

    return [(kind, torch.from_numpy(media).to(dtype)) if kind != "text" else (kind, value)
            for kind, value in spec]


def input_dtype(program, method: str):
    import torch

    name = program.input_dtype(method, 0)
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "uint8": torch.uint8}.get(name, torch.float32)


def verify(program, reference_dir: Path, info: dict, tol: dict) -> dict:
    """Driven as the MultimodalRunner drives it: the logits of every position (the prompt's
    segments, then teacher-forced on the eager tokens) against transformers, and the greedy
    tokens against ``generate``'s (parting only at a near tie of the eager model)."""
    import numpy as np

    from mlxbuild.families.common import compare, first_parting

    fam = family_of_program(program.method_names)
    spec = json.loads((reference_dir / "segments.json").read_text())
    media = np.load(reference_dir / "media.npy")
    ids = np.load(reference_dir / "tokens.npy").tolist()
    ref = np.load(reference_dir / "logits.npy")
    prompt = info["prompt"]
    segments = _segments(spec, media, input_dtype(program, fam.ENCODER))
    new = len(ids) - prompt
    forced = drive(program, segments, new, forced=ids[prompt:], keep_logits=True)
    result = compare(np.concatenate(forced["rows"])[:len(ids)], ref, tol)
    if result["passed"]:
        free = drive(program, segments, new)
        srt = np.sort(ref, axis=-1)
        margins = (srt[:, -1] - srt[:, -2])[prompt - 1:].tolist()
        parted = first_parting(free["tokens"], ids[prompt:], margins, float(result["max_abs_error"]), "the runner loop")
        result["greedy"] = parted or {"passed": free["tokens"] == ids[prompt:], "matched": len(free["tokens"])}
        if not result["greedy"]["passed"]:
            result.update(passed=False, reason=f"greedy tokens: {result['greedy'].get('reason', 'differ')}")
    return result


# --------------------------------------------------------------------------- the runner check


def runner_reference(model, params: dict, tokenizer_dir: Path, out: Path) -> dict:
    """What ExecuTorch's MultimodalRunner must produce, computed its way on the eager model:
    the verification's media, then corpus text as the shipped tokenizer encodes it (no BOS:
    the runner's text inputs are encoded without), then greedy tokens up to
    ``RUNNER_NEW_TOKENS`` or after an EOS; each token's top-1 margin kept."""
    import torch

    from mlxbuild import tokenizer

    fam = family(model.config.model_type)
    text, ids = tokenizer.runner_prompt(tokenizer_dir, params["runner_prompt"])
    inputs = fam.reference_inputs(model, params)
    inputs = fam.with_prompt(model, inputs, before=[], after=ids)
    eos = set(fam.family_config(model)["eos_token_id"] or [])
    seq, tokens, margins = list(inputs["prompt_ids"]), [], []
    while len(tokens) < RUNNER_NEW_TOKENS and len(seq) < params["max_context_length"]:
        top = torch.topk(fam.eager_logits(model, inputs, seq)[-1].float(), 2)
        tokens.append(int(top.indices[0]))
        margins.append(float(top.values[0] - top.values[1]))
        seq.append(tokens[-1])
        if len(tokens) > 1 and tokens[-1] in eos:
            break
    ref = {"media": fam.MODALITY, "text": text, "prompt_tokens": len(inputs["prompt_ids"]), "tokens": tokens,
           "margins": margins,
           "pieces": tokenizer.pieces(tokenizer_dir, tokens), "max_new_tokens": RUNNER_NEW_TOKENS}
    (out / RUNNER_FILE).write_text(json.dumps(ref))
    return {"prompt_tokens": ref["prompt_tokens"], "new_tokens": len(tokens)}


def runner_inputs(reference_dir: Path):
    """What the runner check feeds ExecuTorch's MultimodalRunner: the media, then the text;
    and how many tokens to ask for. None without a runner reference."""
    import numpy as np

    if not (reference_dir / RUNNER_FILE).is_file():
        return None
    ref = json.loads((reference_dir / RUNNER_FILE).read_text())
    kind = {"audio": "audio", "images": "image"}[ref["media"]]
    return [(kind, np.load(reference_dir / "media.npy")), ("text", ref["text"])], ref["max_new_tokens"]


def compare_runner(pieces: list[str], reference_dir: Path, max_abs_error: float) -> dict:
    """The MultimodalRunner's pieces against eager greedy, token for token (parting only at
    a near tie of the eager model)."""
    from mlxbuild.families.common import first_parting

    ref = json.loads((reference_dir / RUNNER_FILE).read_text())
    figures = {"prompt_tokens": ref["prompt_tokens"], "new_tokens": len(pieces), "expected_new_tokens": len(ref["pieces"])}
    parted = first_parting(pieces, ref["pieces"], ref["margins"], max_abs_error, "MultimodalRunner")
    if parted is not None:
        return {**figures, **parted}
    if len(pieces) != len(ref["pieces"]):
        return {**figures, "passed": False, "matched": min(len(pieces), len(ref["pieces"])),
                "reason": f"MultimodalRunner generated {len(pieces)} tokens, eager greedy {len(ref['pieces'])}"}
    return {**figures, "passed": True, "matched": len(pieces)}


# --------------------------------------------------------------------------- mlxbuild run


def prepare_inputs(program, args, tokenizer) -> None:
    fam = family_of_program(program.method_names)
    for flag, method in (("audio", "audio_encoder"), ("image", "vision_encoder")):
        if getattr(args, flag, None) and method not in program.method_names:
            raise ValueError(f"--{flag}: this program has no {method} (its methods: "
                             f"{', '.join(program.method_names)}); it takes {fam.MODALITY}")
    meta = program.constant_methods
    if getattr(args, "prefix_ids", None) is not None:
        try:
            before = [int(t) for t in args.prefix_ids.split()]
        except ValueError:
            raise ValueError(f"--prefix-ids {args.prefix_ids!r}: token ids separated by spaces") from None
    else:
        before = [int(t) for t in meta.get("get_prompt_prefix_ids") or []]
    if getattr(args, "prompt", None):
        if tokenizer is None:
            raise ValueError("--prompt needs a tokenizer (--tokenizer, or the manifest's beside the artifact)")
        after = tokenizer.encode(args.prompt).ids
    elif getattr(args, "ids", None):
        after = [int(t) for t in args.ids.split()]
    else:
        after = []
    media = fam.media(program, args).to(input_dtype(program, fam.ENCODER))
    args.segments = [("text", before), (fam.ENCODER, media)] + ([("text", after)] if after else [])
    args.segments = [s for s in args.segments if not (s[0] == "text" and not s[1])]


def run(program, args) -> dict:
    from mlxbuild.families.decoding import eos_set

    eos = eos_set(program.constant_methods) if not args.no_eos else set()
    result = drive(program, args.segments, args.max_new_tokens, eos)
    result.pop("rows")
    result["prompt_segments"] = [(kind, len(v) if kind == "text" else list(v.shape)) for kind, v in args.segments]
    return result


def describe(result: dict) -> list[str]:
    parts = ", ".join(f"{kind} {n}" for kind, n in result["prompt_segments"])
    rate = len(result["tokens"]) / result["decode_s"] if result["decode_s"] > 0 and result["tokens"] else None
    lines = [f"prompt: {parts} -> {sum(result['segments'])} positions",
             f"generated ({len(result['tokens'])} tokens, stopped: {result['stopped']}): "
             f"{' '.join(map(str, result['tokens']))}"]
    if "text" in result:
        lines.append(f"text: {result['text']}")
    lines.append(f"prefill {result['prefill_s'] * 1000:.1f} ms, decode "
                 f"{'-' if rate is None else f'{rate:.1f}'} tok/s")
    return lines
