"""text-generation: a causal LM with one method,
``forward(input_ids[1, T], cache_position[T]) -> logits[1, T, V]`` over a static KV cache
(T dynamic up to ``max_prefill_chunk``), and the constant methods ExecuTorch's LLM
runners read. Verified like an LLM runner runs it: one prefill, then single-token
decode steps, every logit row against the eager model quantized the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

NAME = "text-generation"
METHODS = ("forward",)
USES_FLAVOUR_ATTENTION = True

# The prompt each verification feeds: a prefill then single-token decode steps.
VERIFY_PROMPT = 8
VERIFY_DECODE_STEPS = 4


# The runner check: a prompt that fills most of the context, then generation (the runner's
# default, max_new_tokens=-1) up to the context limit, at most this many new tokens.
RUNNER_NEW_TOKENS = 32


def verify_spec(max_context_length: int, max_prefill_chunk: int) -> dict:
    return {"prompt": min(VERIFY_PROMPT, max_prefill_chunk),
            "decode_steps": min(VERIFY_DECODE_STEPS, max_context_length - VERIFY_PROMPT),
            "seed": 0,
            "runner_prompt": runner_prompt_length(max_context_length)}


def runner_prompt_length(max_context_length: int) -> int:
    return max_context_length - max(1, min(RUNNER_NEW_TOKENS, max_context_length // 4))


def export(model, params: dict, flavour):
    """``forward`` over the flavour's static KV cache, traced with a dynamic length."""
    import contextlib

    import torch

    from mlxbuild import progress
    from mlxbuild.families import gated_delta, hf
    from mlxbuild.families.moe import ExpertLinears

    hybrid = hf.is_hf(model) and gated_delta.is_hybrid(model)
    with gated_delta.kv_layers_everywhere(model) if hybrid else contextlib.nullcontext():
        exportable = hf.static_exportable(model, params["max_context_length"])
        if hf.is_hf(model):
            hf.check_prefill_chunk(model.config, params["max_prefill_chunk"], params["max_context_length"])
            flavour.install_cache(exportable, model.config, params["max_context_length"],
                                  params["max_prefill_chunk"], hf.DTYPES[params["dtype"]],
                                  sliding=frozenset(hf.sliding_layers(model.config)), experts=ExpertLinears)
    if hybrid:
        gated_delta.install(exportable, model, flavour.gated_delta_rule, flavour.gated_delta_state,
                            hf.DTYPES[params["dtype"]])
    exportable.eval()
    kwargs, dynamic = hf.example_inputs(params["max_prefill_chunk"])
    progress.note("torch.export")
    with torch.no_grad():
        program = torch.export.export(exportable, (), kwargs, dynamic_shapes=dynamic, strict=True)
    return {"forward": program}, {"text_config": hf.text_config(model)}


def constant_methods(params: dict, info: dict) -> dict:
    """What ExecuTorch's LLM runners read (the manifest's own entries go on top)."""
    text = info.get("text_config", {})
    from mlxbuild.families.common import kv_cache_methods  # numpy: not on the planning path

    methods = kv_cache_methods(params)
    if "vocab_size" in text:
        methods["get_vocab_size"] = text["vocab_size"]
    if text.get("bos_token_id") is not None:
        methods["get_bos_id"] = text["bos_token_id"]
    if text.get("eos_token_id") is not None:
        eos = text["eos_token_id"]
        methods["get_eos_ids"] = eos if isinstance(eos, list) else [eos]
    return methods


def prompt_tokens(vocab_size: int, n: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    # Drawn on the host (the same ids wherever the reference runs), then to the default device.
    return torch.randint(0, vocab_size, (1, n), generator=g, device="cpu").to(torch.get_default_device())


def reference(model, params: dict, out: Path) -> dict:
    """Eager logits: one prefill chunk, then greedy single-token steps through a static cache."""
    import numpy as np

    from mlxbuild.families import common, hf

    vocab = hf.text_config(model).get("vocab_size") or params.get("vocab_size", 2)
    tokens = prompt_tokens(vocab, params["prompt"], params["seed"])
    fed, logits = common.leanly(model, lambda: _decode(model, params, tokens))
    np.save(out / "tokens.npy", fed.cpu().numpy())
    np.save(out / "logits.npy", logits.cpu().numpy())
    info = {"prompt": params["prompt"], "decode_steps": params["decode_steps"], "positions": int(logits.shape[0])}
    if common.precise_pass_applies(model):
        from mlxbuild.families import streaming

        del logits
        streaming.trim()  # the eager pass's freed cache and activations, back to the system
        # Every token fed in one prefill, behind a static cache as long as they are: the
        # same logits as step by step to float32's rounding (causal attention), with each
        # weight dequantized once instead of once a step, which was most of the step's time
        # (Qwen3-0.6B's shapes: 33 passes). Not the context's cache: in float32 it alone
        # (235 MB at Qwen3-0.6B's 1,024) was most of the precise pass's extra memory.
        n = int(fed.shape[1])
        whole = {**params, "max_context_length": n, "prompt": n, "decode_steps": 0}
        _, precise = common.precisely(model, lambda: _decode(model, whole, fed))
        np.save(out / common.PRECISE_LOGITS, precise.cpu().numpy())
    return info


def _decode(model, params: dict, tokens):
    """(every token fed, every logit row): a prefill of ``params["prompt"]`` tokens, then one
    token per step, greedy where ``tokens`` holds only the prompt, else the tokens given
    (the precise pass is fed the reference's own)."""
    import torch

    from mlxbuild.families import hf

    exportable = hf.make_exportable(model, params["max_context_length"]).eval()
    n = params["prompt"]
    fed, rows = [tokens[:, :n]], []
    with torch.no_grad():
        step = exportable(input_ids=fed[0], cache_position=torch.arange(n))
        rows.append(step[0].float())
        for pos in range(n, n + params["decode_steps"]):
            nxt = tokens[:, pos:pos + 1] if tokens.shape[1] > pos else step[0, -1].argmax().view(1, 1)
            fed.append(nxt)
            step = exportable(input_ids=nxt, cache_position=torch.tensor([pos]))
            rows.append(step[0].float())
    return torch.cat(fed, dim=1), torch.cat(rows, dim=0)


def run_pte(program, tokens, prompt: int):
    """Prefill `prompt` tokens, then decode the rest one by one; stack every logit row."""
    import torch

    ids = torch.from_numpy(tokens)
    rows = [program.run("forward", [ids[:, :prompt], torch.arange(prompt)])[0][0]]
    for pos in range(prompt, ids.shape[1]):
        rows.append(program.run("forward", [ids[:, pos:pos + 1], torch.tensor([pos])])[0][0])
    return torch.cat(rows).float().numpy()


def verify(program, reference_dir: Path, info: dict, tol: dict) -> dict:
    import numpy as np

    from mlxbuild.families import common

    tokens = np.load(reference_dir / "tokens.npy")
    ref = np.load(reference_dir / "logits.npy")
    precise = reference_dir / common.PRECISE_LOGITS
    return common.compare(run_pte(program, tokens, info["prompt"]), ref, tol,
                   np.load(precise) if precise.is_file() else None)


def run(program, args) -> dict:
    """Greedy decoding from ``args.prompt_ids`` (see ``decoding.generate``)."""
    from mlxbuild.families import decoding

    return decoding.generate(program, args.prompt_ids, args.max_new_tokens,
                                method=getattr(args, "method", None) or "forward", stop_at_eos=not args.no_eos)


def prepare_inputs(program, args, tokenizer) -> None:
    """``args.prompt_ids`` from --prompt (with the tokenizer), --ids, or --random N seeded ids."""
    if args.prompt is not None:
        if tokenizer is None:
            raise ValueError("--prompt needs a tokenizer: --tokenizer PATH, or a manifest that "
                             "names one (recorded in the artifact's .json beside the .pte)")
        args.prompt_ids = tokenizer.encode(args.prompt).ids
    elif args.ids:
        args.prompt_ids = [int(t) for t in args.ids.replace(",", " ").split()]
    else:
        import numpy as np

        vocab = int(program.constant_methods.get("get_vocab_size") or 2)
        args.prompt_ids = np.random.default_rng(args.seed).integers(0, vocab, args.random).tolist()


def describe(result: dict) -> list[str]:
    rate = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    lines = [f"prompt ({len(result['prompt'])}): {' '.join(map(str, result['prompt']))}",
             f"generated ({len(result['tokens'])}, stopped: {result['stopped']}): "
             f"{' '.join(map(str, result['tokens']))}"]
    if "text" in result:
        lines.append(f"text: {result['text']}")
    lines.append(f"prefill {rate(result['prefill_tokens_per_s'])} tok/s, "
                 f"decode {rate(result['decode_tokens_per_s'])} tok/s")
    return lines


# --------------------------------------------------------------------------- quality


def score(forward, tokens, chunk: int):
    """Logits [N, L, V] of each sequence of ``tokens`` [N, L], fed from position 0 in prefill
    chunks of at most ``chunk`` tokens, as a runner prefills a long prompt; ``forward(ids,
    positions)`` is the artifact's method or the eager model. Each sequence starts again at
    position 0: the static cache's later slots are masked by position, as in a runner's
    next conversation."""
    import numpy as np
    import torch

    out = []
    with torch.no_grad():
        for seq in tokens:
            ids = torch.from_numpy(np.ascontiguousarray(seq)).view(1, -1).long()
            rows = [forward(ids[:, s:s + chunk], torch.arange(s, min(s + chunk, ids.shape[1])))[0].float()
                    for s in range(0, ids.shape[1], chunk)]
            out.append(torch.cat(rows).cpu().numpy())
    return np.stack(out)


def eager_forward(model, params: dict):
    """The eager model behind the same static cache the artifact has."""
    from mlxbuild.families import hf

    exportable = hf.make_exportable(model, params["max_context_length"]).eval()
    return lambda ids, pos: exportable(input_ids=ids, cache_position=pos)


def speed(forward, prompt, chunk: int, runs: int = 3, decode_steps: int = 16) -> dict:
    """Build-host tokens per second: a prefill of ``prompt`` (in chunks), then
    ``decode_steps`` single-token steps; the median of ``runs`` runs of each, with the host
    and its load average (a shared build machine is noisy: these are not device figures)."""
    import os
    import platform
    import statistics
    import time

    import torch

    ids = torch.from_numpy(prompt).view(1, -1).long()
    n = ids.shape[1] - decode_steps  # the decode steps write the last positions
    prefill, decode = [], []
    with torch.no_grad():
        for _ in range(runs):
            t0 = time.perf_counter()
            for s in range(0, n, chunk):
                forward(ids[:, s:min(s + chunk, n)], torch.arange(s, min(s + chunk, n)))
            t1 = time.perf_counter()
            for pos in range(n, n + decode_steps):
                forward(ids[:, pos:pos + 1], torch.tensor([pos]))
            t2 = time.perf_counter()
            prefill.append(n / (t1 - t0))
            decode.append(decode_steps / (t2 - t1))
    return {"prefill_tokens_per_s": round(statistics.median(prefill), 1),
            "decode_tokens_per_s": round(statistics.median(decode), 1),
            "prompt_tokens": n, "decode_steps": decode_steps, "runs": runs, "where": "build host",
            "host": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)",
            "load_average": [round(x, 2) for x in os.getloadavg()]}
