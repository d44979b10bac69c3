#!/usr/bin/env python
"""Fit ``mlxbuild.memory.LINE`` (SLOPE, FIXED per step kind) to the peaks measured at two
model sizes, the smaller being the reference size (``Q_REF``/``W_REF``: Qwen3-0.6B at 4 bits).

    python benchmarks/fit_memory_lines.py SMALL.json SMALL_TARGET LARGE.json LARGE_TARGET

Each results file is ``bench_step_process.py``'s (its ``steps``) or ``bench_build.py``'s
(its side-by-side ``step_peaks_mb``). For each kind the plan's estimate is taken apart
(with the line set to (0, 0): what is not the line; with (1, 0): the line's x, the quantized
state or the weights), and the line through the two measured peaks is printed, with what
the fitted estimate gives against each peak. A script, not a test: paste the figures into
``mlxbuild/memory.py`` with the results files they came from.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mlxbuild import memory  # noqa: E402


def measured(path: Path, target: str) -> dict[str, float]:
    """{step kind: peak MB} of ``target`` in a results file."""
    data = json.loads(path.read_text())
    if "runs" in data:
        steps = data["runs"][-1]["steps"]
        name = target.split("/")[1]
        return {s["step"]: s["peak_rss_mb"] for s in steps
                if s.get("peak_rss_mb") and s.get("target", name) == name}
    peaks = data["side_by_side"]["ours"]["step_peaks_mb"]
    return {key.split(" ")[0]: mb for key, mb in peaks.items() if key.endswith(" " + target.split("/")[1])}


def estimates(target: str) -> dict[str, float]:
    from mlxbuild.build import plan_manifests
    from mlxbuild.selection import TargetFilter
    from mlxbuild.settings import Roots

    manifest = REPO / "manifests" / f"{target.split('/')[0]}.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        plan = plan_manifests([str(manifest)], Roots(cache=Path(tmp) / "c", artifacts=Path(tmp) / "a"),
                              TargetFilter(names=(target,)))
    return {str(s.kind): s.memory / memory.MB for s in plan.steps.values() if s.memory}


def main(small: Path, small_target: str, large: Path, large_target: str) -> None:
    saved = dict(memory.LINE)
    parts = {}
    for coeffs in ((0.0, 0.0), (1.0, 0.0)):
        memory.LINE.update({k: coeffs for k in saved})
        parts[coeffs] = (estimates(small_target), estimates(large_target))
    memory.LINE.update(saved)
    peaks = (measured(small, small_target), measured(large, large_target))
    fitted = {}
    for kind in saved:
        if not all(kind in p for p in peaks):
            continue
        rest = [parts[(0.0, 0.0)][i][kind] for i in (0, 1)]
        x = [parts[(1.0, 0.0)][i][kind] - rest[i] for i in (0, 1)]
        y = [peaks[i][kind] - rest[i] for i in (0, 1)]
        slope = (y[1] - y[0]) / (x[1] - x[0])
        fixed = y[0] - slope * x[0]
        fitted[kind] = (round(slope, 2), round(fixed))
        print(f"{kind:10s} x {x[0]:7.0f} -> {x[1]:7.0f} MB, peak {peaks[0][kind]:6.0f} -> {peaks[1][kind]:6.0f} MB: "
              f"SLOPE {slope:.2f}, FIXED {fixed:.0f} MB")
    print("LINE =", json.dumps(fitted))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4])
