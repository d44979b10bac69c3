#!/usr/bin/env python
"""HQQ scale-only quantization of one weight: torchao's function, and what the quantize step
ran before (8,192-row blocks for the largest matrices), against ``mlxbuild.hqq``'s cache-sized
row blocks, on the matrices of one decoder layer of a real checkpoint's shapes
(and its embedding), same run, interleaved, medians. Asserts the two agree bit for bit.

    python benchmarks/bench_hqq.py [--model llama3.1-8b|qwen3-0.6b] [--repeats 3] [--threads N]
        [--output benchmarks/results/hqq-DATE.json]

A script, not a test: the quantize step runs this once per matrix, so the per-layer sum
times the layer count is most of that step's time (the rest is reading and saving).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# (name, rows, columns), one decoder layer's linears, then the embedding.
SHAPES = {
    "llama3.1-8b": {"layers": 32, "group": 32, "matrices": [
        ("q_proj", 4096, 4096), ("k_proj", 1024, 4096), ("v_proj", 1024, 4096), ("o_proj", 4096, 4096),
        ("gate_proj", 14336, 4096), ("up_proj", 14336, 4096), ("down_proj", 4096, 14336)],
        "once": [("embed_tokens", 128256, 4096)]},
    "qwen3-0.6b": {"layers": 28, "group": 32, "matrices": [
        ("q_proj", 2048, 1024), ("k_proj", 1024, 1024), ("v_proj", 1024, 1024), ("o_proj", 1024, 2048),
        ("gate_proj", 3072, 1024), ("up_proj", 3072, 1024), ("down_proj", 1024, 3072)],
        "once": [("embed_tokens", 151936, 1024)]},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--output", type=Path, default=None)
    ap.add_argument("--skip-embedding", action="store_true",
                    help="leave the embedding out (torchao's function takes ~5x its fp32 size: 10 GB at 8B)")
    args = ap.parse_args()

    import torch
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_scale_only_hqq

    from mlxbuild import hqq

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = SHAPES[args.model]
    group, qmin, qmax = spec["group"], -8, 7
    gen = torch.Generator().manual_seed(0)
    rows = []
    once = [] if args.skip_embedding else spec["once"]
    for name, n, k in spec["matrices"] + once:
        w = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)
        times = {"torchao": [], "before": [], "mlxbuild": []}
        for _ in range(args.repeats):
            # What the quantize step ran before the cache-sized blocks: torchao's function, or
            # 8,192-row blocks for a matrix of 64 MiB of fp32 or more.
            t0 = time.perf_counter()
            if n * k * 4 >= 64 * 2**20:
                hqq.quantize(w, group, qmin, qmax, rows=8192)
            else:
                _choose_qparams_and_quantize_scale_only_hqq(w, [1, group], qmin, qmax)
            times["before"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            q0, s0 = _choose_qparams_and_quantize_scale_only_hqq(w, [1, group], qmin, qmax)
            times["torchao"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            q1, s1 = hqq.quantize(w, group, qmin, qmax)
            times["mlxbuild"].append(time.perf_counter() - t0)
            if not (torch.equal(q0.to(torch.int8), q1) and torch.equal(s0, s1)):
                raise SystemExit(f"{name}: mlxbuild.hqq differs from torchao's function")
            del q0, s0, q1, s1
        med = {key: statistics.median(v) for key, v in times.items()}
        rows.append({"matrix": name, "shape": [n, k], "seconds": times,
                     "median_s": {key: round(v, 3) for key, v in med.items()},
                     "torchao_over_mlxbuild": round(med["torchao"] / med["mlxbuild"], 2),
                     "before_over_mlxbuild": round(med["before"] / med["mlxbuild"], 2)})
        print(f"{name:12s} {n:6d} x {k:5d}  torchao {med['torchao']:7.2f} s  before {med['before']:7.2f} s"
              f"  mlxbuild {med['mlxbuild']:6.2f} s  ({rows[-1]['torchao_over_mlxbuild']}x,"
              f" {rows[-1]['before_over_mlxbuild']}x)", flush=True)

    def model_seconds(key: str) -> float:
        per_layer = sum(r["median_s"][key] for r in rows[:len(spec["matrices"])])
        return per_layer * spec["layers"] + sum(r["median_s"][key] for r in rows[len(spec["matrices"]):])

    whole = {key: round(model_seconds(key), 1) for key in ("torchao", "before", "mlxbuild")}
    result = {
        "benchmark": "hqq scale-only quantization, torchao's function against mlxbuild.hqq",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model_shapes": args.model, "embedding_included": not args.skip_embedding, "group_size": group, "bits": 4, "input_dtype": "bf16",
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(),
                 "loadavg": os.getloadavg()},
        "code": subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                               text=True).stdout.strip(),
        "matrices": rows,
        "whole_model_estimate_s": whole,
        "whole_model_ratio": round(whole["torchao"] / whole["mlxbuild"], 2),
        "whole_model_ratio_before": round(whole["before"] / whole["mlxbuild"], 2),
        "bit_identical": True,
    }
    print(f"whole model (layers x per-layer sum{'' if args.skip_embedding else ' + embedding'}): "
          f"torchao {whole['torchao']} s, before {whole['before']} s, mlxbuild {whole['mlxbuild']} s "
          f"({result['whole_model_ratio']}x, {result['whole_model_ratio_before']}x)")
    out = args.output or REPO / "benchmarks" / "results" / f"hqq-{args.model}-{datetime.date.today()}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
