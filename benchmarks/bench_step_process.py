#!/usr/bin/env python
"""Peak memory of one real-sized target built with every step in the build's process
(``MLXBUILD_STEP_PROCESS=never``, the old way) against one process per heavy step
(``auto``: a Qwen3-0.6B-sized model qualifies), same run, same machine.

Builds ``--target`` of ``manifests/bench-qwen3-0.6b.yaml`` (Qwen3-0.6B's shapes, synthetic
bf16 weights) from a fresh cache for each mode and records wall time, the largest resident
set of any process of the build (``ru_maxrss`` of the doit process read with ``os.wait4``:
the kernel folds its reaped children's peaks into it) and, for ``auto``, each child step's
own peak from the build report. The weights entry's size is recorded as the yardstick.

    python benchmarks/bench_step_process.py                    # ~25 min on 2 cores
    python benchmarks/bench_step_process.py --modes auto       # one mode
    python benchmarks/bench_step_process.py --modes auto --no-etrecord \
        --manifest manifests/bench-qwen3-1.7b.yaml --target bench-qwen3-1.7b/mlx-4w

Writes ``benchmarks/results/step-process-<date>.json``. A script, not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build(mode: str, target: str, workdir: Path, etrecord: bool = True,
          manifest_path: Path = REPO / "manifests" / "bench-qwen3-0.6b.yaml") -> dict:
    env = {**os.environ, "MLXBUILD_STEP_PROCESS": mode, "MLXBUILD_CACHE": str(workdir / "cache"),
           "MLXBUILD_ARTIFACTS": str(workdir / "artifacts"), "MLXBUILD_PLAIN": "1"}
    # A snapshot of the code: edits made while the benchmark runs can't change its keys.
    src = workdir / "src"
    for package in ("mlxbuild", "backends", "mlx_runtime"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    env["PYTHONPATH"] = os.pathsep.join([str(src)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    doit = Path(sys.executable).with_name("doit")
    import yaml

    manifest = yaml.safe_load(manifest_path.read_text())
    for t in manifest["targets"]:
        t["etrecord"] = etrecord
    (workdir / "bench.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    cmd = [str(doit), "build", "--report", str(workdir / "report.json"), "--target", target,
           str(workdir / "bench.yaml")]
    start = time.monotonic()
    with open(workdir / "build.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    code = os.waitstatus_to_exitcode(status)
    report = json.loads((workdir / "report.json").read_text()) if (workdir / "report.json").exists() else {}
    targets = [t for m in report.get("manifests", []) for t in m["targets"]]
    steps = [{"target": t["target"], "step": s["step"], "seconds": s["seconds"], "peak_rss_mb": s.get("peak_rss_mb"),
              "memory_estimate_mb": s.get("memory_estimate_mb"),
              # the plan's estimate against the measured peak (mlxbuild.memory)
              "estimate_over_peak": round(s["memory_estimate_mb"] / s["peak_rss_mb"], 3)
              if s.get("memory_estimate_mb") and s.get("peak_rss_mb") else None}
             for t in targets for s in t["steps"]]
    weights = sum(f.stat().st_size for f in (workdir / "cache" / "weights").rglob("*") if f.is_file())
    # disk the cache holds, per step kind (hard links counted once)
    cache_mb, seen = {}, set()
    for f in (workdir / "cache").rglob("*"):
        if f.is_file() and (f.stat().st_ino not in seen):
            seen.add(f.stat().st_ino)
            kind = f.relative_to(workdir / "cache").parts[0]
            cache_mb[kind] = cache_mb.get(kind, 0) + f.stat().st_size / 2**20
    cache_mb = {k: round(v, 1) for k, v in sorted(cache_mb.items())}
    artifacts = {p.name: p.stat().st_size for p in (workdir / "artifacts").rglob("*")
                 if p.suffix in (".pte", ".ptd")}
    # the yardstick: a target's artifact is its .pte plus any .ptd beside it
    largest = max((sum(size for name, size in artifacts.items() if Path(name).stem == Path(pte).stem)
                   for pte in artifacts if pte.endswith(".pte")), default=0)
    return {"mode": mode, "etrecord": etrecord, "exit": code, "wall_s": round(wall, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "weights_entry_mb": round(weights / 2**20, 1), "artifacts": artifacts,
            "largest_artifact_mb": round(largest / 2**20, 1),
            "peak_over_largest_artifact": round(usage.ru_maxrss * 1024 / largest, 2) if largest else None,
            "cache_mb": cache_mb, "cache_total_mb": round(sum(cache_mb.values()), 1),
            "verified": [t.get("verification", {}) and t["verification"].get("passed") for t in targets],
            # per target: how far the artifact is from the reference, the bound it was held to and,
            # where the reference rounds, both distances from the precise logits
            "verification": {t["target"]: {k: (t.get("verification") or {}).get(k) for k in
                                            ("max_rel_error", "allowed_rel_error", "top1_agreement_decisive",
                                             "precise_reference")} for t in targets},
            "failures": [t["failure"]["message"] for t in targets if t.get("failure")],
            "quality": [{k: (t.get("quality") or {}).get(k) for k in ("kld_mean", "top1", "passed")} for t in targets],
            "steps": steps}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="bench-qwen3-0.6b/mlx-4w")
    ap.add_argument("--manifest", type=Path, default=REPO / "manifests" / "bench-qwen3-0.6b.yaml")
    ap.add_argument("--modes", nargs="+", default=["never", "auto"])
    ap.add_argument("--no-etrecord", action="store_true", help="targets without an ETRecord")
    ap.add_argument("--output", type=Path,
                    default=None)
    args = ap.parse_args()
    runs = []
    for mode in args.modes:
        workdir = Path(tempfile.mkdtemp(prefix=f"bench-{mode}-"))
        try:
            runs.append(build(mode, args.target, workdir, etrecord=not args.no_etrecord,
                              manifest_path=args.manifest.resolve()))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "steps"}), flush=True)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    result = {"benchmark": "step-process", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                       "load_avg": os.getloadavg()}, "target": args.target, "runs": runs}
    if len(runs) == 2 and runs[0]["peak_rss_mb"]:
        result["peak_ratio_auto_to_never"] = round(runs[1]["peak_rss_mb"] / runs[0]["peak_rss_mb"], 3)
        result["wall_ratio_auto_to_never"] = round(runs[1]["wall_s"] / runs[0]["wall_s"], 3)
    if args.output is None:
        args.output = REPO / "benchmarks" / "results" / f"step-process-{args.target.split('/')[0]}-{dt.date.today()}.json"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
