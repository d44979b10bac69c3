#!/usr/bin/env python
"""The reference step's time, before and after its lean passes, same run, interleaved:

- before: the eager pass through torchao's forwards (each call dequantizes its whole weight,
  an embedding every row), and the precise pass step by step like the eager one;
- now: the eager pass through ``common.leanly`` (bit for bit the same logits, checked here),
  and the precise pass with every token in one prefill (the same to float32's rounding).

    python benchmarks/bench_reference.py [--manifest manifests/bench-qwen3-0.6b.yaml]
        [--scheme 4w] [--repeats 2] [--output benchmarks/results/reference-DATE.json]

Synthetic weights with the manifest's shapes are written and quantized once into a temporary
folder (about 2 GB at Qwen3-0.6B's shapes); the runner check (it needs a tokenizer) is left
out. A script, not a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


class _Cache:
    """The two entries the reference reads, by kind."""

    def __init__(self, **entries: Path):
        self.entries = entries

    def read(self, kind: str, key: str) -> Path:
        return self.entries[kind]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", type=Path, default=REPO / "manifests" / "bench-qwen3-0.6b.yaml")
    ap.add_argument("--scheme", default="4w")
    ap.add_argument("--prompt", type=int, default=992)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args()

    import numpy as np
    import yaml

    from mlxbuild.families import common, text_generation
    from mlxbuild.families.hf import DTYPES
    from mlxbuild.stages import quantize as quantize_stage
    from mlxbuild.stages import reference, weights
    from mlxbuild.steps import QuantizeParams, ReferenceParams

    manifest = yaml.safe_load(args.manifest.read_text())
    recipe, dtype = manifest["model"]["source"]["synthetic"], manifest["model"]["dtype"]
    scheme = manifest["quantization"][args.scheme]
    ctx = manifest.get("export", {}).get("max_context_length", 1024)
    root = Path(tempfile.mkdtemp(prefix="bench-reference-"))
    try:
        w, q = root / "weights", root / "quantize"
        w.mkdir()
        q.mkdir()
        weights.write_synthetic(recipe, DTYPES[dtype], w)
        (w / "source.json").write_text(json.dumps({"load": {"synthetic": recipe}, "dtype": dtype}))
        cache = _Cache(weights=w, quantize=q)
        quantize_stage.run(QuantizeParams(weights="w", scheme=scheme, dtype=dtype), cache, q)
        params = ReferenceParams(weights="w", quantized="q", dtype=dtype, max_context_length=ctx,
                                 max_prefill_chunk=ctx, task="text-generation", prompt=args.prompt,
                                 decode_steps=args.decode_steps, seed=0)

        lean, decode = common.leanly, text_generation._decode

        def stepwise(model, p, tokens):
            # the precise pass as it ran before: the eager pass's prefill, then a step a token
            if p["decode_steps"] == 0 and p["prompt"] == tokens.shape[1] == args.prompt + args.decode_steps:
                p = {**p, "prompt": args.prompt, "decode_steps": args.decode_steps}
            return decode(model, p, tokens)

        variants = {
            "before": (lambda model, fn: fn(), stepwise),
            "now": (lean, decode),
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        outputs = {}
        for _ in range(args.repeats):
            for name, (leanly, dec) in variants.items():
                common.leanly, text_generation._decode = leanly, dec
                out = root / f"ref-{name}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                t0 = time.perf_counter()
                reference.run(params, cache, out)
                times[name].append(time.perf_counter() - t0)
                outputs[name] = {f: np.load(out / f) for f in ("logits.npy", common.PRECISE_LOGITS)
                                 if (out / f).exists()}
                print(f"{name}: {times[name][-1]:.1f} s", flush=True)
        common.leanly, text_generation._decode = lean, decode
        a, b = outputs["before"], outputs["now"]
        same_eager = bool(np.array_equal(a["logits.npy"], b["logits.npy"]))
        precise_diff = None
        if common.PRECISE_LOGITS in a:
            pa, pb = a[common.PRECISE_LOGITS], b[common.PRECISE_LOGITS]
            precise_diff = float(np.abs(pa - pb).max() / np.abs(pa).max())
        med = {k: statistics.median(v) for k, v in times.items()}
        result = {
            "benchmark": "reference step: torchao's eager forwards and a stepwise precise pass, "
                         "against the lean eager pass and a one-prefill precise pass",
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "manifest": str(args.manifest.relative_to(REPO) if args.manifest.is_relative_to(REPO) else args.manifest),
            "scheme": args.scheme, "dtype": dtype, "prompt": args.prompt, "decode_steps": args.decode_steps,
            "context": ctx, "repeats": args.repeats,
            "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg": os.getloadavg()},
            "code": subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                   text=True).stdout.strip(),
            "seconds": times, "median_s": {k: round(v, 1) for k, v in med.items()},
            "before_over_now": round(med["before"] / med["now"], 2),
            "eager_logits_bit_identical": same_eager,
            "precise_logits_max_rel_difference": precise_diff,
        }
        print(json.dumps({k: result[k] for k in ("median_s", "before_over_now", "eager_logits_bit_identical",
                                                  "precise_logits_max_rel_difference")}))
        out = args.output or REPO / "benchmarks" / "results" / f"reference-{datetime.date.today()}.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
