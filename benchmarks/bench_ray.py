#!/usr/bin/env python
"""Distributed builds: the 12-target tiny matrix (``manifests/bench-matrix-tiny.yaml``, 72
steps) built locally with ``doit build -n 2`` and through ``--executor ray`` on a local Ray
cluster of two 1-CPU worker nodes (the same two cores), alternating, from fresh caches each
time; then a plan-level projection of an 8B release matrix on N workers.

Per-step overhead on Ray: for each step a worker built, the report's ``overhead`` (from the
moment the Ray task began on the worker to the driver holding its reply, minus the stage's
work: the checks, fetching its inputs from the remote cache, pushing its entry, the reply).
That is what every step pays on a cluster of any size. Waiting for a free worker is not in
it (a local ``-n 2`` build waits for a free process too); the wall times show the whole.
``driver_seconds`` (the ``ok ... (X s)`` line) is kept per step for reference.

The projection plans a release of ``--models`` Llama-3.1-8B-shaped models with six targets
each (MLX 4-bit and 8-bit bf16, XNNPACK 8da4w fp32, portable fp32, Core ML fp32 computing in
fp16, Vulkan fp16), takes each step kind's time at 8B by extending the line through the
measured Qwen3-0.6B and 1.7B step times (``benchmarks/results/step-process-bench-qwen3-*``;
their MLX lowering stands for every backend's), adds the measured per-step overhead and the
time to move each step's inputs at ``--bandwidth``, and schedules the steps on N workers,
longest remaining path first. It is a model of the schedule, not a measurement of an 8B build.

    python benchmarks/bench_ray.py                  # ~25 min on 2 cores (2 runs of each)
    python benchmarks/bench_ray.py --repeats 1 --projection-only

Writes ``benchmarks/results/ray-<date>.json``. A script, not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import heapq
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the S3 server and Ray cluster the tests start
sys.path.insert(0, str(REPO))
MANIFEST = REPO / "manifests" / "bench-matrix-tiny.yaml"
OK = re.compile(r"^ok (\w+) (.+) \(([\d.]+) s\)$")
STEP_RESULTS = {0.596: "step-process-bench-qwen3-0.6b-2026-12-06.json",
                1.721: "step-process-bench-qwen3-1.7b-2026-12-06.json"}  # billions of parameters


def _doit() -> str:
    return str(Path(sys.executable).with_name("doit"))


def build(workdir: Path, env: dict, executor: str | None) -> dict:
    workdir.mkdir(parents=True)
    shutil.copy(MANIFEST, workdir / "m.yaml")
    args = [_doit(), "build", "--report", "report.json"]
    args += (["--executor", executor] if executor else ["-n", "2"]) + ["m.yaml"]
    t0 = time.monotonic()
    p = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"build failed ({executor or 'local'}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    report = json.loads((workdir / "report.json").read_text())
    seen = {}
    for line in p.stdout.splitlines():
        m = OK.match(line)
        if m:
            seen[f"{m[1]} {m[2]}"] = float(m[3])
    steps = []
    for man in report["manifests"]:
        for t in man["targets"]:
            for s in t["steps"]:
                steps.append({**s, "driver_seconds": seen.get(f"{s['step']} {s['label']}")})
    unique = {s["task"]: s for s in steps}
    return {"wall_s": round(wall, 1), "steps": list(unique.values()), "cache": report["cache"]}


def overheads(run: dict) -> list[float]:
    return [s["overhead"] for s in run["steps"] if s.get("overhead") is not None]


def measure(repeats: int) -> dict:
    import raycluster
    import s3server

    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    runs = {"local": [], "ray": []}
    try:
        (root / "s3").mkdir()
        with s3server.running(root / "s3") as s3:
            base = {**os.environ, **s3.env, "MLXBUILD_PLAIN": "1", "PYTHONPATH": str(REPO)}
            for k in ("MLXBUILD_CACHE", "MLXBUILD_ARTIFACTS", "MLXBUILD_REMOTE_CACHE", "RAY_ADDRESS"):
                base.pop(k, None)
            with raycluster.running(root, base, workers=2) as cluster:
                for i in range(repeats):
                    local = root / f"local-{i}"
                    runs["local"].append(build(local, {**base, "MLXBUILD_CACHE": str(local / "cache"),
                                                      "MLXBUILD_ARTIFACTS": str(local / "artifacts"),
                                                      "MLXBUILD_REMOTE_CACHE": "off"}, None))
                    print(f"local {i}: {runs['local'][-1]['wall_s']} s", flush=True)
                    for cache in cluster.caches:  # fresh worker caches: every step is built
                        shutil.rmtree(cache, ignore_errors=True)
                        cache.mkdir(parents=True)
                    driver = root / f"ray-{i}"
                    runs["ray"].append(build(driver, {**base, "MLXBUILD_CACHE": str(driver / "cache"),
                                                     "MLXBUILD_ARTIFACTS": str(driver / "artifacts"),
                                                     "MLXBUILD_REMOTE_CACHE": f"s3://{s3server.BUCKET}/bench-{i}"},
                                             f"ray={cluster.address}"))
                    print(f"ray {i}: {runs['ray'][-1]['wall_s']} s", flush=True)
                    differ = sorted(p.name for p in (driver / "artifacts" / "matrix-tiny" / "0.1.0").iterdir()
                                    if (root / f"local-{i}" / "artifacts" / "matrix-tiny" / "0.1.0" / p.name)
                                    .read_bytes() != p.read_bytes())
                    runs["ray"][-1]["byte_identical_to_local"] = not differ
                    runs["ray"][-1]["differing_files"] = differ
    finally:
        shutil.rmtree(root, ignore_errors=True)
    over = [o for r in runs["ray"] for o in overheads(r)]
    work = {m: [sum(s["seconds"] or 0 for s in r["steps"] if s["step"] != "package") for r in runs[m]]
            for m in runs}
    wl, wr = statistics.median(r["wall_s"] for r in runs["local"]), statistics.median(r["wall_s"] for r in runs["ray"])
    return {
        "steps": len(runs["local"][0]["steps"]),
        "wall_s": {"local_n2": wl, "ray_2_workers": wr, "ray_over_local": round(wr / wl, 3)},
        "work_s_sum": {m: statistics.median(v) for m, v in work.items()},
        "ray_overhead_per_step_s": {"median": round(statistics.median(over), 3),
                                    "p90": round(sorted(over)[int(0.9 * (len(over) - 1))], 3),
                                    "n": len(over)},
        "byte_identical_to_local": all(r["byte_identical_to_local"] for r in runs["ray"]),
        "runs": {m: [{k: v for k, v in r.items() if k != "steps"} for r in rs] for m, rs in runs.items()},
        "per_step": {m: [{k: s.get(k) for k in ("step", "label", "cache", "seconds", "overhead", "driver_seconds",
                                                "node")}
                         for s in rs[0]["steps"]] for m, rs in runs.items()},
    }


# --------------------------------------------------------------------------- the projection


def kind_seconds_at(billions: float) -> dict[str, float]:
    """Each step kind's seconds at ``billions`` parameters, on the line through the measured
    0.6B and 1.7B MLX 4-bit builds (scaled from the 0.6B alone where 1.7B has no figure)."""
    points = {}
    for b, name in STEP_RESULTS.items():
        data = json.loads((REPO / "benchmarks" / "results" / name).read_text())
        run = data["runs"][0]
        points[b] = {s["step"]: s["seconds"] for s in run["steps"] if s.get("seconds")}
    (b0, p0), (b1, p1) = sorted(points.items())
    out = {}
    for kind in p0:
        if kind in p1:
            slope = (p1[kind] - p0[kind]) / (b1 - b0)
            out[kind] = max(p1[kind], p1[kind] + slope * (billions - b1))
        else:
            out[kind] = p0[kind] * billions / b0
    return out


def project(models: int, overhead: float, bandwidth: float, workers: list[int]) -> dict:
    import yaml

    from mlxbuild.build import plan_manifests
    from mlxbuild.memory import artifact_bytes_per_param
    from mlxbuild.settings import Roots

    billions = 8.03
    data = {
        "name": "llama8b", "version": "1.0.0",
        "model": {"source": {"synthetic": {"architecture": "llama", "seed": 0, "config": {
            "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
            "rope_theta": 500000.0, "tie_word_embeddings": False, "bos_token_id": 128000,
            "eos_token_id": 128001}}}, "dtype": "bf16", "task": "text-generation"},
        "export": {"max_context_length": 2048},
        "quantization": {"4w": {"linear": {"bits": 4, "group_size": 32}, "embedding": {"bits": 4, "group_size": 32}},
                         "8w": {"linear": {"bits": 8, "group_size": "per_channel"}},
                         "8da4w": {"linear": {"bits": 4, "group_size": 32, "activations": "int8_dynamic"},
                                   "embedding": {"bits": 8, "group_size": "per_channel"}}},
        "targets": [{"name": "mlx-4w", "backend": "mlx", "quantization": "4w"},
                    {"name": "mlx-8w", "backend": "mlx", "quantization": "8w"},
                    {"name": "xnnpack-8da4w", "backend": "xnnpack", "quantization": "8da4w", "dtype": "fp32"},
                    {"name": "portable-fp32", "backend": "portable", "quantization": "none", "dtype": "fp32"},
                    {"name": "coreml-fp32", "backend": "coreml", "quantization": "none", "dtype": "fp32",
                     "options": {"precision": "fp16"}},
                    {"name": "vulkan-fp16", "backend": "vulkan", "quantization": "none", "dtype": "fp16"}],
    }
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "llama8b.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        plan = plan_manifests([str(path)], Roots(Path(d) / "cache", Path(d) / "artifacts"))
    seconds = kind_seconds_at(billions)
    params = billions * 1e9

    def output_bytes(step) -> float:
        if step.kind in ("weights",):
            return params * 2
        if step.kind in ("quantize", "export", "lower"):
            scheme = getattr(step.params, "scheme", None)
            return params * artifact_bytes_per_param(scheme if isinstance(scheme, dict) else None, "bf16")
        return 1e7  # records, references, tokenizers: small

    durations, deps = {}, {}
    for m in range(models):
        for name, step in plan.steps.items():
            if step.kind == "package":
                continue
            inputs = sum(output_bytes(plan.steps[d]) for d in step.deps)
            durations[(m, name)] = seconds.get(str(step.kind), seconds.get("lower")) + overhead + inputs / bandwidth
            deps[(m, name)] = [(m, d) for d in step.deps if plan.steps[d].kind != "package"]
    users = {k: [] for k in durations}
    for k, ds in deps.items():
        for d in ds:
            users[d].append(k)
    rank = {}

    def longest(k):  # the longest path from k to the end: the priority
        if k not in rank:
            rank[k] = durations[k] + max((longest(u) for u in users[k]), default=0.0)
        return rank[k]

    for k in durations:
        longest(k)
    out = {"models": models, "targets_per_model": len(data["targets"]), "steps": len(durations),
           "seconds_per_kind_at_8b": {k: round(v, 1) for k, v in seconds.items()},
           "overhead_per_step_s": overhead, "bandwidth_bytes_s": bandwidth,
           "critical_path_h": round(max(rank.values()) / 3600, 2),
           "total_work_h": round(sum(durations.values()) / 3600, 2), "wall_h": {}}
    for n in workers:
        out["wall_h"][n] = round(_schedule(durations, deps, rank, n) / 3600, 2)
    return out


def _schedule(durations, deps, rank, n: int) -> float:
    left = {k: len(v) for k, v in deps.items()}
    users = {k: [] for k in durations}
    for k, ds in deps.items():
        for d in ds:
            users[d].append(k)
    ready = [(-rank[k], k) for k, c in left.items() if c == 0]
    heapq.heapify(ready)
    running, now, free = [], 0.0, n
    while ready or running:
        while ready and free:
            _, k = heapq.heappop(ready)
            heapq.heappush(running, (now + durations[k], k))
            free -= 1
        now, k = heapq.heappop(running)
        free += 1
        for u in users[k]:
            left[u] -= 1
            if left[u] == 0:
                heapq.heappush(ready, (-rank[u], u))
    return now


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--projection-only", action="store_true", help="reuse --overhead, measure nothing")
    ap.add_argument("--overhead", type=float, default=None, help="seconds per step (default: measured)")
    ap.add_argument("--models", type=int, default=5)
    ap.add_argument("--bandwidth", type=float, default=500e6, help="bytes/s between workers and the remote cache")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = {"benchmark": "ray", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
              "manifest": str(MANIFEST.relative_to(REPO))}
    if not args.projection_only:
        result["measured"] = measure(args.repeats)
    overhead = args.overhead if args.overhead is not None else \
        result.get("measured", {}).get("ray_overhead_per_step_s", {}).get("median", 1.0)
    result["projection_8b"] = project(args.models, overhead, args.bandwidth, [1, 2, 4, 8, 16, 32, 64])
    out = args.out or REPO / "benchmarks" / "results" / f"ray-{dt.date.today().isoformat()}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k in ("measured", "projection_8b")}, indent=1)[:4000])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
