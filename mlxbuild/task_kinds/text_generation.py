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

# The prompt each verification feeds: a prefill then single-token decode steps.
VERIFY_PROMPT = 8
VERIFY_DECODE_STEPS = 4


def verify_spec(max_context_length: int, max_prefill_chunk: int) -> dict:
    return {"prompt": min(VERIFY_PROMPT, max_prefill_chunk),
            "decode_steps": min(VERIFY_DECODE_STEPS, max_context_length - VERIFY_PROMPT),
            "seed": 0}


def _quantized_model(params: dict, cache, attn: str | None = None):
    from mlxbuild import llm
    from mlxbuild.stages import quantize

    model = llm.load_model(cache.read("weights", params["weights"]), params["dtype"], attn)
    quantize.load_into(model, cache.read("quantize", params["quantized"]))
    return model


def build_exportable(params: dict, cache, flavour_name: str):
    import delegate
    from mlxbuild import llm

    flavour = delegate.flavour(flavour_name)
    model = _quantized_model(params, cache, flavour.attention_implementation())
    exportable = llm.make_exportable(model, params["max_context_length"])
    if llm.is_hf(model):
        flavour.install_cache(exportable, model.config, params["max_context_length"],
                              params["max_prefill_chunk"], llm.DTYPES[params["dtype"]])
    return model, exportable.eval()


def export(params: dict, cache, flavour_name: str):
    import torch

    from mlxbuild import llm, progress

    progress.note("loading quantized model")
    model, exportable = build_exportable(params, cache, flavour_name)
    kwargs, dynamic = llm.example_inputs(params["max_prefill_chunk"])
    progress.note("torch.export")
    with torch.no_grad():
        program = torch.export.export(exportable, (), kwargs, dynamic_shapes=dynamic, strict=True)
    return {"forward": program}, {"text_config": llm.text_config(model)}


def constant_methods(params: dict, info: dict) -> dict:
    """What ExecuTorch's LLM runners read (the manifest's own entries go on top)."""
    text = info.get("text_config", {})
    from mlxbuild.task_kinds.common import kv_cache_methods  # numpy: not on the planning path

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
    return torch.randint(0, vocab_size, (1, n), generator=g)


def reference(params: dict, cache, out: Path) -> dict:
    """Eager logits: one prefill chunk, then greedy single-token steps through a static cache."""
    import numpy as np
    import torch

    from mlxbuild import llm

    model = _quantized_model(params, cache)
    exportable = llm.make_exportable(model, params["max_context_length"]).eval()
    vocab = llm.text_config(model).get("vocab_size") or params.get("vocab_size", 2)
    tokens = prompt_tokens(vocab, params["prompt"], params["seed"])
    logits, fed = [], [tokens]
    with torch.no_grad():
        step = exportable(input_ids=tokens, cache_position=torch.arange(tokens.shape[1]))
        logits.append(step[0].float())
        pos = tokens.shape[1]
        for _ in range(params["decode_steps"]):
            nxt = step[0, -1].argmax().view(1, 1)
            fed.append(nxt)
            step = exportable(input_ids=nxt, cache_position=torch.tensor([pos]))
            logits.append(step[0].float())
            pos += 1
    np.save(out / "tokens.npy", torch.cat(fed, dim=1).numpy())
    np.save(out / "logits.npy", torch.cat(logits, dim=0).numpy())
    (out / "reference.json").write_text(json.dumps({"prompt": params["prompt"],
                                                    "decode_steps": params["decode_steps"]}))
    return {"positions": int(sum(x.shape[0] for x in logits))}


def run_pte(pte: Path, tokens, prompt: int, backend=None):
    """Prefill `prompt` tokens, then decode the rest one by one; stack every logit row.

    Runs on the backend's own host runtime when it has one (``backend.load_method``,
    e.g. MLX through mlx.core), else on ExecuTorch's runtime."""
    import torch

    from mlxbuild.task_kinds.common import EtProgram

    if backend is not None and hasattr(backend, "load_method"):
        execute = backend.load_method(pte, "forward")
    else:
        program = EtProgram(pte)
        execute = lambda inputs: program.run("forward", inputs)  # noqa: E731
    ids = torch.from_numpy(tokens)
    rows = [execute([ids[:, :prompt], torch.arange(prompt)])[0][0]]
    for pos in range(prompt, ids.shape[1]):
        rows.append(execute([ids[:, pos:pos + 1], torch.tensor([pos])])[0][0])
    return torch.cat(rows).float().numpy()


def verify(pte: Path, reference_dir: Path, tol: dict, backend=None) -> dict:
    import numpy as np

    from mlxbuild.task_kinds.common import compare, native_stderr_captured, runtime_failure

    tokens = np.load(reference_dir / "tokens.npy")
    ref = np.load(reference_dir / "logits.npy")
    prompt = json.loads((reference_dir / "reference.json").read_text())["prompt"]
    try:
        with native_stderr_captured() as log:
            got = run_pte(pte, tokens, prompt, backend)
    except Exception as e:  # a runtime error is a verification failure, not a crash
        return runtime_failure(e, log)
    return compare(got, ref, tol)


def run(program, args) -> dict:
    """Greedy decoding from ``args.prompt_ids`` (see ``delegate.mlx_runtime.generate``)."""
    from delegate import mlx_runtime

    return mlx_runtime.generate(program, args.prompt_ids, args.max_new_tokens,
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
