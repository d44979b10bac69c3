#!/usr/bin/env python
"""Peak memory and time of the synthetic weights step: the model generated a piece at a
time into safetensors shards (``mlxbuild.stages.weights.write_synthetic``, what builds do)
against the whole-model way it replaced (``from_config`` in fp32, cast, ``save_pretrained``),
each in a fresh process, alternating, same machine, same run.

    python benchmarks/bench_synthetic_weights.py                          # Qwen3-0.6B shapes, bf16
    python benchmarks/bench_synthetic_weights.py --manifest manifests/llama3.2-1b.yaml --repeat 1

Records each run's wall time and peak RSS (``ru_maxrss`` via ``os.wait4``), medians, their
ratios and the checkpoint's size. Writes ``benchmarks/results/synthetic-weights-<date>.json``.
A script, not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
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

STREAMED = """
import sys, torch, yaml
from pathlib import Path
from mlxbuild.stages.weights import write_synthetic
from mlxbuild.families.hf import DTYPES
m = yaml.safe_load(open(sys.argv[1]))
write_synthetic(m["model"]["source"]["synthetic"], DTYPES[m["model"]["dtype"]], Path(sys.argv[2]))
"""
WHOLE = """
import sys, torch, yaml, transformers
from pathlib import Path
from transformers import AutoConfig
from mlxbuild.families import auto_class_name, model_type_of
from mlxbuild.families.hf import DTYPES
m = yaml.safe_load(open(sys.argv[1]))
r = m["model"]["source"]["synthetic"]
config = AutoConfig.for_model(model_type_of(r["architecture"]), **r["config"])
torch.manual_seed(r["seed"])
model = getattr(transformers, auto_class_name(config.model_type)).from_config(config, dtype=torch.float32)
model.to(DTYPES[m["model"]["dtype"]]).save_pretrained(sys.argv[2])
"""


def run(code: str, manifest: Path, out: Path) -> dict:
    out.mkdir(parents=True)
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", code, str(manifest), str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(proc.stderr.read().decode()[-2000:])
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    shards = len(list(out.glob("*.safetensors")))
    shutil.rmtree(out)
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "checkpoint_mb": round(size / 2**20, 1), "shards": shards}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", default=str(REPO / "manifests" / "bench-qwen3-0.6b.yaml"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    manifest = Path(args.manifest).resolve()
    runs = {"streamed": [], "whole": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            for way, code in (("streamed", STREAMED), ("whole", WHOLE)):
                r = run(code, manifest, Path(tmp) / f"{way}-{i}")
                runs[way].append(r)
                print(way, r, flush=True)
    med = {way: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "peak_rss_mb")}
           for way, rs in runs.items()}
    result = {
        "benchmark": "synthetic-weights", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "load_avg": list(os.getloadavg())},
        "manifest": str(manifest.relative_to(REPO)) if manifest.is_relative_to(REPO) else str(manifest),
        "runs": runs, "median": med,
        "ratio_streamed_to_whole": {k: round(med["streamed"][k] / med["whole"][k], 3) for k in ("wall_s", "peak_rss_mb")},
    }
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"synthetic-weights-{dt.date.today()}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["median"]), result["ratio_streamed_to_whole"], "->", out)


if __name__ == "__main__":
    main()
