#!/usr/bin/env python
"""The plan's memory estimates (``mlxbuild.memory``, as the code stands now) against the peaks
that ``bench_step_process.py`` measured, step by step, for each results file given.

    python benchmarks/compare_memory_estimates.py benchmarks/results/step-process-bench-qwen3-*-2026-12-06.json

Writes ``benchmarks/results/memory-estimates-<date>.json``: per model and step kind the
estimate, the measured peak and their ratio, and the largest deviation. A script, not a test.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def estimates(manifest: Path, target: str) -> dict[str, float]:
    """{step kind: estimate} of one target's steps."""
    from mlxbuild.build import plan_manifests
    from mlxbuild.selection import TargetFilter
    from mlxbuild.settings import Roots

    with tempfile.TemporaryDirectory() as tmp:
        plan = plan_manifests([str(manifest)], Roots(cache=Path(tmp) / "c", artifacts=Path(tmp) / "a"),
                              TargetFilter(names=(target,)))
    return {str(s.kind): round(s.memory / 2**20, 1) for s in plan.steps.values() if s.memory}


def by_target(steps: list[dict]) -> dict[str, list[dict]]:
    """A run's steps per target: named in newer results, else in the report's order (each
    target's list starts again at its weights step)."""
    out: dict[str, list[dict]] = {}
    n = -1
    for s in steps:
        if "target" not in s and s["step"] == "weights":
            n += 1
        out.setdefault(s.get("target") or f"#{n}", []).append(s)
    return out


def main(paths: list[str]) -> None:
    out = {}
    for path in paths:
        result = json.loads(Path(path).read_text())
        if "side_by_side" in result:  # bench_build.py's: the compare build's step peaks
            ours = result["side_by_side"]["ours"]
            manifest_name = Path(result["manifest"]).stem
            result = {"target": f"{manifest_name}/{result['side_by_side']['target']}",
                      "runs": [{"steps": [{"target": key.split(" ")[1], "step": key.split(" ")[0],
                                           "peak_rss_mb": mb} for key, mb in ours["step_peaks_mb"].items()]}]}
        manifest_name = result["target"].split("/")[0]
        manifest = REPO / "manifests" / f"{manifest_name}.yaml"
        run = result["runs"][-1]
        names = [t["name"] for t in yaml.safe_load(manifest.read_text())["targets"]]
        for key, steps in by_target(run["steps"]).items():
            name = names[int(key[1:])] if key.startswith("#") else key
            target = f"{manifest_name}/{name}"
            if "*" not in result["target"] and target != result["target"]:
                continue
            est = estimates(manifest, target)
            rows = {}
            for s in steps:
                if s.get("peak_rss_mb") and s["step"] in est:
                    rows[s["step"]] = {"estimate_mb": est[s["step"]], "measured_mb": s["peak_rss_mb"],
                                       "ratio": round(est[s["step"]] / s["peak_rss_mb"], 3)}
            out[target] = {"source": Path(path).name, "weights_entry_mb": run.get("weights_entry_mb"),
                           "steps": rows,
                           "largest_deviation": max((abs(r["ratio"] - 1) for r in rows.values()), default=None)}
            print(target, json.dumps(rows, indent=1))
    dest = REPO / "benchmarks" / "results" / f"memory-estimates-{dt.date.today()}.json"
    dest.write_text(json.dumps({"benchmark": "memory-estimates",
                                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                "models": out}, indent=1) + "\n")
    print("wrote", dest)


if __name__ == "__main__":
    main(sys.argv[1:])
