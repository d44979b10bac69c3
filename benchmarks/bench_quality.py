#!/usr/bin/env python
"""Quality figures of the shipped manifests and of the quantization methods, from real builds.

1. ``manifests/qwen.yaml`` and ``manifests/qwen-mixed.yaml``: every target's KL divergence and
   top-1 agreement against the float model, its size, and the mixed schemes' per-rule figures.
2. Rounding (HQQ) against AWQ and GPTQ at the same bits and group size, on the tiny Qwen3 of
   ``tests/test_quality.py`` (weights drawn with ``initializer_range: 0.3``, so its outputs are
   peaked) and on the same model with 4 outlier channels at 8x: MLX 4-bit and 2-bit, and
   XNNPACK 4-bit with int8 dynamic activations.

Each from a fresh cache, one build per manifest (``doit build --report``), then the published
records are read. ~6 min on 2 cores.

    python benchmarks/bench_quality.py

Writes ``benchmarks/results/quality-<date>.json``. A script, not a test.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

METHODS = """\
name: methods{suffix}
version: 0.1.0
model:
  source:
    synthetic:
      architecture: qwen3
      seed: 0
      config: {{vocab_size: 512, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
               num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16, tie_word_embeddings: true,
               initializer_range: 0.3, bos_token_id: 1, eos_token_id: 2}}{outliers}
  dtype: fp32
export: {{max_context_length: 64}}
quality:
  sequences: 2
  seq_len: 32
  max_kld: 1000
  min_top1: 0
  max_ppl_increase: 1000
quantization:
{schemes}
targets:
{targets}
"""
WIDTHS = {"w4": "{bits: 4, group_size: 32}", "w2": "{bits: 2, group_size: 32}",
          "a8w4": "{bits: 4, group_size: 32, activations: int8_dynamic}"}
METHOD_NAMES = ("rtn", "awq", "gptq")


def _methods_manifest(outliers: bool) -> str:
    schemes, targets = [], []
    for width, linear in WIDTHS.items():
        for method in METHOD_NAMES:
            if width == "a8w4" and method == "awq":
                continue  # the same folded scales as w4's: nothing new to measure
            name = f"{width}-{method}"
            schemes.append(f"  {name}: {{linear: {linear}, method: {method}}}")
            backend = "xnnpack" if width.startswith("a8") else "mlx"
            targets.append(f"  - {{name: {backend}-{name}, backend: {backend}, quantization: {name}}}")
    return METHODS.format(suffix="-outliers" if outliers else "",
                          outliers="\n      outliers: {channels: 4, scale: 8.0}" if outliers else "",
                          schemes="\n".join(schemes), targets="\n".join(targets))


def build(manifest: Path, work: Path) -> dict:
    env = {**os.environ, "MLXBUILD_CACHE": str(work / "cache"), "MLXBUILD_ARTIFACTS": str(work / "artifacts"),
           "MLXBUILD_PLAIN": "1"}
    doit = Path(sys.executable).with_name("doit")
    p = subprocess.run([str(doit), "build", "--report", str(work / "report.json"), str(manifest)], cwd=work,
                       env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{manifest}: exit {p.returncode}\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
    report = json.loads((work / "report.json").read_text())
    out = {}
    for t in report["manifests"][0]["targets"]:
        q = t.get("quality") or {}
        files = t.get("files") or {}
        out[t["target"]] = {
            "backend": t["backend"], "scheme": t["scheme"],
            "size": sum(f["size"] for name, f in files.items() if name.endswith((".pte", ".ptd"))),
            **{k: q.get(k) for k in ("kld_mean", "kld_p99", "top1", "top1_decisive", "ppl_increase")},
            "rules": {r: {k: v.get(k) for k in ("rule", "layers", "quantization", "kld_mean", "top1")}
                      for r, v in (q.get("rules") or {}).items()} or None,
        }
    return out


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("qwen.yaml", "qwen-mixed.yaml"):
            work = Path(tmp) / name
            work.mkdir()
            results[name] = build(REPO / "manifests" / name, work)
            print(name, json.dumps(results[name], indent=1), flush=True)
        for outliers in (False, True):
            work = Path(tmp) / f"methods-{outliers}"
            work.mkdir()
            (work / "m.yaml").write_text(_methods_manifest(outliers))
            key = "methods-outliers" if outliers else "methods"
            results[key] = build(work / "m.yaml", work)
            print(key, json.dumps({t: round(v["kld_mean"], 4) for t, v in results[key].items()}), flush=True)
    out = REPO / "benchmarks" / "results" / f"quality-{dt.date.today()}.json"
    out.write_text(json.dumps({
        "benchmark": "quality", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count()}, "results": results}, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
