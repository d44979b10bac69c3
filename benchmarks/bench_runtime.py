#!/usr/bin/env python
"""Runtime benchmark: prefill and decode tokens/s of an MLX-delegated .pte through
``mlx_runtime`` against mlx-lm running the same checkpoint (same bits,
same group size) on the same host, in the same run.

Steps:

1. a synthetic Qwen3 (transformers ``Qwen3Config``, seeded) is saved with
   ``save_pretrained`` into a temporary directory, with a word-level tokenizer
   (mlx-lm's converter loads one; our build ignores it);
2. a manifest (``path:`` source, ``--dtype``, one ``mlx`` target quantizing linear
   and embedding ``--bits``/``--group-size``, ``max_prefill_chunk`` >= the prompt)
   is built with ``doit build`` (MLXBUILD_CACHE / MLXBUILD_ARTIFACTS in the tmp dir);
3. mlx-lm converts the same folder with its own API
   (``mlx_lm.convert(hf, out, quantize=True, q_bits=, q_group_size=)``, offline);
4. both sides are timed on the same prompt ids: prefill = one forward over P tokens,
   decode = N single-token greedy steps with the KV cache (mlx-lm: its prompt cache,
   ``mx.eval`` per step; ours: one ``program.run`` per step, which evaluates and
   returns numpy logits). The two sides' repeats alternate (after one warm-up
   each); medians over ``--repeats``; ratios ours / mlx-lm.

Records the dtype each side's quantized matmuls compute in (mlx-lm: the model
dtype, read from a quantized layer's ``.scales.dtype``; ours: the payload's scales
dtype and whether ``precision="auto"`` promotes half types to float32 on the CPU),
the load average before/after (the machine may be shared), and a breakdown of one
decode call of our runtime (graph interpretation in Python vs ``mx.eval``).

mlx-lm is a benchmark-only dependency (``pip install mlx-lm``), not in pyproject.

Usage::

    python benchmarks/bench_runtime.py                      # default config, fp32, 4-bit g32
    python benchmarks/bench_runtime.py --config 0.6b --dtype bf16
    python benchmarks/bench_runtime.py --prompt-len 64 --new-tokens 64 --repeats 5 --keep

This is a script, not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CONFIGS = {
    "default": dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=64),
    # Qwen3-0.6B's shapes
    "0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128),
}
COMMON = dict(max_position_embeddings=4096, rope_theta=1000000.0, tie_word_embeddings=True,
              bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6)


def loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def make_checkpoint(out: Path, config: str, seed: int, dtype: str) -> dict:
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = Qwen3Config(**CONFIGS[config], **COMMON)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).eval()
    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    model = model.to(tdt)
    model.config.dtype = tdt
    model.save_pretrained(out, safe_serialization=True)
    # A word-level tokenizer over the vocabulary: mlx-lm's loader wants one.
    vocab = {f"t{i}": i for i in range(cfg.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1",
                            eos_token="t2").save_pretrained(out)
    d = {k: getattr(cfg, k, None) for k in (*CONFIGS[config], *COMMON)}
    d["rope_parameters"] = getattr(cfg, "rope_parameters", None)
    return d


def write_manifest(path: Path, ckpt: Path, args, ctx: int) -> None:
    import yaml

    group = args.group_size if args.group_size == "per_channel" else int(args.group_size)
    scheme = {"bits": args.bits, "group_size": group}
    doc = {
        "name": "bench-runtime",
        "version": "0.1.0",
        "model": {"source": {"path": str(ckpt)}, "dtype": args.dtype, "task": "text-generation"},
        "export": {"max_context_length": ctx, "max_prefill_chunk": args.prompt_len},
        "quantization": {"q": {"linear": dict(scheme), "embedding": dict(scheme)}},
        "targets": [{"name": "mlx", "backend": "mlx", "quantization": "q"}],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def build(manifest: Path, work: Path) -> tuple[Path, float]:
    env = dict(os.environ, MLXBUILD_CACHE=str(work / "cache"), MLXBUILD_ARTIFACTS=str(work / "artifacts"))
    doit = Path(sys.executable).parent / "doit"
    t0 = time.perf_counter()
    r = subprocess.run([str(doit), "build", "-v", "0", str(manifest)], cwd=REPO, env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.stderr.write(r.stdout + r.stderr)
        raise SystemExit(f"doit build failed ({r.returncode})")
    ptes = sorted((work / "artifacts").rglob("*.pte"))
    if not ptes:
        raise SystemExit("doit build produced no .pte")
    return ptes[0], wall


# --------------------------------------------------------------------------- mlx-lm side

def mlxlm_side(hf: Path, out: Path, args, prompt: list[int]) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx_lm
    from mlx_lm import convert
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    t0 = time.perf_counter()
    gs = None if args.group_size == "per_channel" else int(args.group_size)
    convert(str(hf), str(out), quantize=True, q_bits=args.bits, q_group_size=gs)
    convert_s = time.perf_counter() - t0
    model, config = load_model(out)
    mx.eval(model.parameters())
    qlayers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    scales = sorted({str(m.scales.dtype) for _, m in qlayers})
    wdtypes = sorted({str(p.dtype) for _, p in _leaves(model.parameters())})

    prompt_mx = mx.array([prompt])
    pre, dec, toks, build_ms = [], [], None, []
    for rep in range(args.warmup + args.repeats):
        cache = make_prompt_cache(model)
        t0 = time.perf_counter()
        logits = model(prompt_mx, cache=cache)
        mx.eval(logits)
        t1 = time.perf_counter()
        y = mx.argmax(logits[:, -1, :], axis=-1)
        out_toks = [y.item()]
        t2 = time.perf_counter()
        built = 0.0
        for _ in range(args.new_tokens):
            s = time.perf_counter()
            logits = model(y[:, None], cache=cache)
            y = mx.argmax(logits[:, -1, :], axis=-1)
            built += time.perf_counter() - s
            mx.eval(y)
            out_toks.append(y.item())
        t3 = time.perf_counter()
        if rep >= args.warmup:
            pre.append(t1 - t0)
            dec.append(t3 - t2)
            build_ms.append(1e3 * built / args.new_tokens)
            toks = out_toks
        yield  # the repeats of the two sides alternate (see main)
    return {"version": mlx_lm.__version__, "convert_s": convert_s,
            "quantized_layers": len(qlayers), "scales_dtype": scales, "param_dtypes": wdtypes,
            "matmul_dtype": scales[0] if len(scales) == 1 else scales,
            "prefill_s": pre, "decode_s": dec, "tokens": toks,
            # Python time building one decode step's lazy graph (model call + argmax), median ms
            "decode_graph_build_ms": statistics.median(build_ms)}


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _leaves(v, f"{prefix}.{i}")
    else:
        yield prefix, tree


# --------------------------------------------------------------------------- our side

def ours_side(pte: Path, args, prompt: list[int]) -> dict:
    import numpy as np
    import mlx.core as mx

    import mlx_runtime
    from mlx_runtime import graph as _graph

    t0 = time.perf_counter()
    prog = mlx_runtime.load(pte, precision=args.precision)
    prog.method("forward")
    load_s = time.perf_counter() - t0
    ids = np.array([prompt], dtype=np.int64)
    pos = np.arange(len(prompt), dtype=np.int64)
    pre, dec, toks = [], [], None
    for rep in range(args.warmup + args.repeats):
        prog.reset("forward")
        prog.method("forward")  # constants and init chain outside the timings
        t0 = time.perf_counter()
        logits = prog.run("forward", [ids, pos])[0]
        t1 = time.perf_counter()
        nxt = int(logits[0, -1].argmax())
        out_toks = [nxt]
        p = len(prompt)
        t2 = time.perf_counter()
        for _ in range(args.new_tokens):
            logits = prog.run("forward", [np.array([[nxt]], dtype=np.int64), np.array([p], dtype=np.int64)])[0]
            nxt = int(logits[0, -1].argmax())
            out_toks.append(nxt)
            p += 1
        t3 = time.perf_counter()
        if rep >= args.warmup:
            pre.append(t1 - t0)
            dec.append(t3 - t2)
            toks = out_toks
        yield  # the repeats of the two sides alternate (see main)

    # Which dtype do the quantized matmuls see? the payload's scales / the promotion flag.
    meth = prog.method("forward")
    info = _delegate_info(meth, mx)

    # Breakdown of decode calls: time inside mx.eval vs the rest (interpretation in Python,
    # input/output conversion), then a cProfile of one call.
    prog.reset("forward")
    prog.method("forward")
    prog.run("forward", [ids, pos])
    p = len(prompt)
    real_eval = mx.eval
    spent = {"eval": 0.0}

    def timed_eval(*a, **k):
        s = time.perf_counter()
        r = real_eval(*a, **k)
        spent["eval"] += time.perf_counter() - s
        return r

    real_chain = _graph.MLXGraphRunner.run_chain
    depth = {"n": 0}
    spent["chain"] = 0.0

    def timed_chain(self, frame, index):  # outermost chain only: building the lazy graph
        depth["n"] += 1
        s = time.perf_counter()
        try:
            return real_chain(self, frame, index)
        finally:
            depth["n"] -= 1
            if depth["n"] == 0:
                spent["chain"] += time.perf_counter() - s

    steps = min(16, args.new_tokens)
    _graph.mx.eval = timed_eval
    _graph.MLXGraphRunner.run_chain = timed_chain
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            prog.run("forward", [np.array([[5]], dtype=np.int64), np.array([p], dtype=np.int64)])
            p += 1
        total = time.perf_counter() - t0
    finally:
        _graph.mx.eval = real_eval
        _graph.MLXGraphRunner.run_chain = real_chain
    prof = cProfile.Profile()
    prof.enable()
    prog.run("forward", [np.array([[5]], dtype=np.int64), np.array([p], dtype=np.int64)])
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(12)
    top = [ln for ln in s.getvalue().splitlines() if ln.strip()][:24]
    breakdown = {"calls": steps, "per_call_ms": 1e3 * total / steps,
                 "mx_eval_ms": 1e3 * spent["eval"] / steps,
                 "outside_eval_ms": 1e3 * (total - spent["eval"]) / steps,
                 "outside_eval_fraction": (total - spent["eval"]) / total,
                 "graph_build_ms": 1e3 * spent["chain"] / steps,
                 "io_and_other_ms": 1e3 * (total - spent["eval"] - spent["chain"]) / steps,
                 "cprofile_top_tottime": top}
    return {"load_s": load_s, "precision": args.precision, **info,
            "prefill_s": pre, "decode_s": dec, "tokens": toks, "decode_breakdown": breakdown}


def _delegate_info(meth, mx) -> dict:
    """Scales dtypes and promotion of the MLX delegate(s) inside a loaded method."""
    graphs = []
    seen = set()
    for obj in _walk(meth, depth=3):
        if hasattr(obj, "promote") and hasattr(obj, "constants") and id(obj) not in seen:
            seen.add(id(obj))
            graphs.append(obj)
    promote = sorted({bool(g.promote) for g in graphs})
    const_dtypes = sorted({str(c.dtype) for g in graphs for c in g.constants if c is not None})
    nodes = {}
    for g in graphs:
        try:
            for k, v in g.node_counts().items():
                nodes[k] = nodes.get(k, 0) + v
        except Exception:
            pass
    half = any(d in ("mlx.core.float16", "mlx.core.bfloat16") for d in const_dtypes)
    float_consts = [d for d in const_dtypes if "float" in d]
    if promote == [True] and half:
        matmul = "float32 (half scales promoted by precision=auto on CPU)"
    elif len(float_consts) == 1:
        matmul = float_consts[0]
    else:
        matmul = float_consts
    return {"delegates": len(graphs), "promote_half_to_fp32": promote, "constant_dtypes": const_dtypes,
            "matmul_dtype": matmul, "node_counts": dict(sorted(nodes.items(), key=lambda kv: -kv[1])[:12])}


def _walk(obj, depth):
    yield obj
    if depth == 0:
        return
    vals = list(vars(obj).values()) if hasattr(obj, "__dict__") else []
    for v in vals:
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, (list, tuple)):
            for x in v:
                if hasattr(x, "__dict__") and not isinstance(x, type):
                    yield from _walk(x, depth - 1)
        elif hasattr(v, "__dict__") and not isinstance(v, type):
            yield from _walk(v, depth - 1)


# --------------------------------------------------------------------------- main

def summarize(side: dict, P: int, N: int) -> dict:
    mp, md = statistics.median(side["prefill_s"]), statistics.median(side["decode_s"])
    return {"prefill_median_s": mp, "decode_median_s": md,
            "prefill_tok_s": P / mp, "decode_tok_s": N / md,
            "decode_ms_per_token": 1e3 * md / N}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="default")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", default="32")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="auto", choices=["auto", "native", "float32"])
    ap.add_argument("--output", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()

    import mlx.core as mx
    import numpy as np

    started = dt.datetime.now(dt.timezone.utc)
    load_before = loadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-runtime-"))
    try:
        hf = work / "hf"
        cfg = make_checkpoint(hf, args.config, args.seed, args.dtype)
        ctx = args.prompt_len + args.new_tokens + 8
        manifest = work / "bench-runtime.yaml"
        write_manifest(manifest, hf, args, ctx)
        print(f"building {manifest} ...", flush=True)
        pte, build_s = build(manifest, work)
        print(f"built {pte.name} in {build_s:.1f} s ({pte.stat().st_size / 1e6:.1f} MB)", flush=True)

        rng = np.random.default_rng(args.seed)
        prompt = [int(x) for x in rng.integers(3, cfg["vocab_size"], size=args.prompt_len)]

        # Both sides are generators yielding after each repeat: the repeats alternate
        # (mlx-lm, ours, mlx-lm, ours, ...) so a load spike on the shared machine hits
        # both sides rather than one.
        print("mlx-lm convert, then alternating repeats of mlx-lm and ours ...", flush=True)
        active = {"mlx_lm": mlxlm_side(hf, work / "mlx_lm", args, prompt), "ours": ours_side(pte, args, prompt)}
        done: dict = {}
        while active:
            for name, gen in list(active.items()):
                try:
                    next(gen)
                except StopIteration as stop:
                    done[name] = stop.value
                    del active[name]
        theirs, ours = done["mlx_lm"], done["ours"]
        load_after = loadavg()

        P, N = args.prompt_len, args.new_tokens
        so, st = summarize(ours, P, N), summarize(theirs, P, N)
        agree = sum(a == b for a, b in zip(ours["tokens"], theirs["tokens"]))
        result = {
            "benchmark": "runtime",
            "date": started.isoformat(timespec="seconds"),
            "host": {"platform": platform.platform(), "machine": platform.machine(),
                     "python": platform.python_version(), "cpus": os.cpu_count(),
                     "mlx": mx.__version__, "mlx_device": str(mx.default_device()),
                     "loadavg_before": load_before, "loadavg_after": load_after},
            "git": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                  text=True).stdout.strip(),
            "model": {"config": args.config, **cfg, "dtype": args.dtype, "seed": args.seed},
            "quantization": {"bits": args.bits, "group_size": args.group_size,
                             "linear": True, "embedding": True},
            "prompt_len": P, "new_tokens": N, "repeats": args.repeats, "warmup": args.warmup,
            "build_s": build_s, "pte_bytes": pte.stat().st_size,
            "ours": {**ours, **so}, "mlx_lm": {**theirs, **st},
            "ratio_ours_over_mlx_lm": {"prefill_tok_s": so["prefill_tok_s"] / st["prefill_tok_s"],
                                       "decode_tok_s": so["decode_tok_s"] / st["decode_tok_s"]},
            "greedy_tokens_agree": f"{agree}/{min(len(ours['tokens']), len(theirs['tokens']))}",
        }
        out = args.output or REPO / "benchmarks" / "results" / f"runtime-{started.date().isoformat()}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")

        r = result["ratio_ours_over_mlx_lm"]
        print()
        print(f"{args.config} {args.dtype} {args.bits}-bit g{args.group_size}, P={P} N={N}, "
              f"median of {args.repeats}; loadavg {load_before} -> {load_after}")
        print(f"{'':10}{'prefill tok/s':>15}{'decode tok/s':>15}{'ms/token':>10}  matmul dtype")
        for name, s, side in (("ours", so, ours), ("mlx-lm", st, theirs)):
            print(f"{name:10}{s['prefill_tok_s']:15.1f}{s['decode_tok_s']:15.1f}"
                  f"{s['decode_ms_per_token']:10.2f}  {side['matmul_dtype']}")
        print(f"{'ratio':10}{r['prefill_tok_s']:15.2f}{r['decode_tok_s']:15.2f}   (goal >= 0.90)")
        b = ours["decode_breakdown"]
        print(f"our decode call: {b['per_call_ms']:.2f} ms = mx.eval {b['mx_eval_ms']:.2f} ms "
              f"+ outside eval {b['outside_eval_ms']:.2f} ms ({100 * b['outside_eval_fraction']:.0f}%: "
              f"graph build {b['graph_build_ms']:.2f} ms, inputs/outputs/other {b['io_and_other_ms']:.2f} ms)")
        print(f"mlx-lm decode step: graph build {theirs['decode_graph_build_ms']:.2f} ms, "
              f"mx.eval + .item() {st['decode_ms_per_token'] - theirs['decode_graph_build_ms']:.2f} ms")
        print(f"greedy tokens agree: {result['greedy_tokens_agree']}")
        print(f"wrote {out}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
