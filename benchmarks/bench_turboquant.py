#!/usr/bin/env python
"""TurboQuant KV cache against the plain one on an MLX target: cache bytes and logit error.

Builds two MLX 4-bit bf16 targets of one manifest (Qwen3-0.6B's shapes by default,
synthetic weights), one with ``options: {kv_cache: turboquant}``, then runs both artifacts
through ``mlx_runtime`` (TurboQuant's Metal kernels computed with mlx ops) over a prompt
and greedy-free teacher-forced decode steps, and records:

- the bytes of each program's mutable state (the KV cache) at its declared dtypes;
- the TurboQuant artifact's logit error against the plain one (max and mean, relative to
  the largest logit), top-1 agreement, and the verification records of both.

    python benchmarks/bench_turboquant.py                      # ~15 min on 2 cores
    python benchmarks/bench_turboquant.py --layers 4 --context 512

Writes ``benchmarks/results/turboquant-<date>.json``. A script, not a test; synthetic
weights, so the error is that of random-weight keys and values, not a trained model's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", type=Path, default=REPO / "manifests" / "bench-qwen3-0.6b.yaml")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the manifest's (faster)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args()

    manifest = yaml.safe_load(args.manifest.read_text())
    config = manifest["model"]["source"]["synthetic"]["config"]
    if args.layers:
        config["num_hidden_layers"] = args.layers
        config.pop("max_window_layers", None)
    manifest["model"]["dtype"] = "bf16"
    manifest["export"]["max_context_length"] = args.context
    manifest["quantization"] = {"4w": {"linear": {"bits": 4, "group_size": 32},
                                       "embedding": {"bits": 4, "group_size": 32}}}
    manifest["targets"] = [{"name": "mlx-4w", "backend": "mlx", "quantization": "4w"},
                           {"name": "mlx-4w-tq4", "backend": "mlx", "quantization": "4w",
                            "options": {"kv_cache": "turboquant"}}]
    work = Path(tempfile.mkdtemp(prefix="bench-tq-"))
    (work / "tq.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    env = {**os.environ, "MLXBUILD_CACHE": str(work / "cache"), "MLXBUILD_ARTIFACTS": str(work / "artifacts"),
           "MLXBUILD_PLAIN": "1"}
    doit = Path(sys.executable).with_name("doit")
    with open(work / "build.log", "w") as log:
        code = subprocess.call([str(doit), "build", "tq.yaml"], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    import numpy as np

    import mlx_runtime
    from mlxbuild.build import plan_manifests
    from mlxbuild.families import text_generation
    from mlxbuild.settings import Roots

    # The lowered programs from the cache: a target that failed verification is measured too.
    os.environ.update(MLXBUILD_CACHE=env["MLXBUILD_CACHE"])
    plan = plan_manifests([str(work / "tq.yaml")], Roots(cache=work / "cache", artifacts=work / "artifacts"))
    lowered = {s.label.split("/")[-1]: work / "cache" / "lower" / s.key[:2] / s.key
               for s in plan.steps.values() if str(s.kind) == "lower"}
    verified = {s.label.split("/")[-1]: work / "cache" / "verify" / s.key[:2] / s.key / "verify.json"
                for s in plan.steps.values() if str(s.kind) == "verify"}
    log = (work / "build.log").read_text().splitlines()
    tokens = np.random.default_rng(0).integers(0, config["vocab_size"], (1, args.prompt + args.decode))
    runs = {}
    for target in ("mlx-4w", "mlx-4w-tq4"):
        published = work / "artifacts" / manifest["name"] / manifest["version"] / f"{manifest['name']}-{target}.pte"
        pte = published if published.is_file() else lowered[target] / "model.pte"
        program = mlx_runtime.load(pte)
        state = sum(d.state_bytes() for d in program.method("forward").delegates)
        logits = text_generation.run_pte(program, tokens, args.prompt)
        if published.is_file():  # verified: its record has the figures (and the quality's)
            full = json.loads(published.with_suffix(".json").read_text())
            record = {**full["verification"], "quality": {k: (full.get("quality") or {}).get(k)
                                                          for k in ("kld_mean", "top1", "ppl_increase")}}
        else:
            record = json.loads(verified[target].read_text()) if verified[target].is_file() else \
                {"failed": [line for line in log if line.startswith("FAIL") and target in line]}
        runs[target] = {"state_bytes": int(state), "pte_bytes": pte.stat().st_size, "logits": logits,
                        "verification": {k: record.get(k) for k in
                                         ("passed", "max_rel_error", "top1_agreement", "top1_agreement_decisive",
                                          "tolerance", "failed", "quality") if k in record}}
    plain, tq = runs["mlx-4w"]["logits"], runs["mlx-4w-tq4"]["logits"]
    scale = float(np.abs(plain).max())
    result = {
        "benchmark": "turboquant", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "model": {"shapes_of": args.manifest.name, "layers": config["num_hidden_layers"],
                  "head_dim": config.get("head_dim"), "kv_heads": config.get("num_key_value_heads"),
                  "dtype": "bf16", "scheme": "4w", "context": args.context, "weights": "synthetic"},
        "prompt_tokens": args.prompt, "decode_steps": args.decode,
        "kv_cache_bytes": {"static": runs["mlx-4w"]["state_bytes"], "turboquant": runs["mlx-4w-tq4"]["state_bytes"]},
        "kv_cache_ratio": round(runs["mlx-4w-tq4"]["state_bytes"] / runs["mlx-4w"]["state_bytes"], 4),
        "logit_error_vs_static": {
            "max_rel": round(float(np.abs(tq - plain).max()) / scale, 5),
            "mean_rel": round(float(np.abs(tq - plain).mean()) / float(np.abs(plain).mean()), 5),
            "top1_agreement": round(float((tq.argmax(-1) == plain.argmax(-1)).mean()), 4)},
        "pte_bytes": {t: r["pte_bytes"] for t, r in runs.items()},
        "verification": {t: r["verification"] for t, r in runs.items()},
        "build_exit": code,
    }
    if args.output is None:
        args.output = REPO / "benchmarks" / "results" / f"turboquant-{dt.date.today()}.json"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "verification"}))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
