#!/usr/bin/env python
"""Build benchmark: how long and how much memory `doit build` takes on a real-sized model.

Builds ``manifests/bench-qwen3-0.6b.yaml`` (Qwen3-0.6B's architecture, synthetic
weights, three MLX targets) in a fresh temporary working directory and records:

- cold build: wall time, each step's time (parsed from the reporter's
  ``ok <kind> <label> (N s)`` lines), peak RSS, and the sampled RSS peak of
  each step (doit without ``-n`` runs every step in its own process, so the
  step that drives the whole build's peak can be named);
- no-op rebuild: median of ``--noop-runs`` runs;
- one-target change: a copy of the manifest where one target's scheme changes
  (its linear group size), rebuilt on the warm cache;
- ``.pte`` sizes;
- side by side with ExecuTorch's own script: a cold build of only the
  ``--compare-target`` target (a filtered manifest copy, fresh cache), and
  ``python -m executorch.backends.mlx.examples.llm.export_llm_hf`` on the same
  synthetic weights (the Hugging Face folder of the cold build's weights cache
  entry) with the matching flags; wall and peak RSS of both, and their ratios.

Peak RSS is ``ru_maxrss`` of the measured child, read with ``os.wait4`` (the
per-child form of ``getrusage(RUSAGE_CHILDREN)``: each measurement gets its
own child, so one run's peak does not carry into the next).

The code measured is a snapshot taken when the benchmark starts (``--code
head``: the committed tree; ``worktree``: the files as they are), put first on
PYTHONPATH, so edits made in the repository while the benchmark runs can't
change cache keys half-way (a "no-op" would silently become a rebuild).

Usage::

    python benchmarks/bench_build.py                       # everything: ~55 min on 2 busy cores
    python benchmarks/bench_build.py --no-compare          # only our build
    python benchmarks/bench_build.py --only-compare        # only the side-by-side
    python benchmarks/bench_build.py --output benchmarks/results/x.json --keep

This is a script, not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MANIFEST = REPO / "manifests" / "bench-qwen3-0.6b.yaml"
VENV_BIN = Path(sys.executable).parent
ET_MODULE = "executorch.backends.mlx.examples.llm.export_llm_hf"
# ExecuTorch's export script on this machine, as reported in the issue.
ET_REFERENCE = {"wall_s": 190.0, "peak_rss_gb": 5.06}

STEP_START = re.compile(r"^\.  (\S+) (.*)$")
STEP_OK = re.compile(r"^ok (\S+) (.*) \(([0-9.]+) s\)$")

# Runs ExecuTorch's script in this process after generating the MLX schema it imports.
ET_WRAPPER = (
    "import runpy, sys\n"
    "from backends.mlx_schema import ensure_mlx_schema\n"
    "ensure_mlx_schema()\n"
    f"sys.argv = ['export_llm_hf', *sys.argv[1:]]\n"
    f"runpy.run_module({ET_MODULE!r}, run_name='__main__', alter_sys=True)\n"
)


# --------------------------------------------------------------------------- measuring


def _rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(cmd: list[str], cwd: Path, env: dict, log: Path, sample_s: float = 0.25) -> dict:
    """Run ``cmd``; return wall time, exit code, peak RSS (wait4) and the steps it reported.

    stdout and stderr go, merged and in order, to ``log``. A sampler reads the
    child's RSS so each reported step gets the largest RSS seen while it ran.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    steps: list[dict] = []
    current: dict = {"step": None}
    samples: dict = {"max_kib": 0}
    t0 = time.monotonic()
    load_before = os.getloadavg()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    done = threading.Event()

    def sample():
        while not done.wait(sample_s):
            kib = _rss_kib(proc.pid)
            if kib is None:
                continue
            samples["max_kib"] = max(samples["max_kib"], kib)
            step = current["step"]
            if step is not None:
                step["sampled_peak_rss_kib"] = max(step.get("sampled_peak_rss_kib", 0), kib)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    open_steps: dict[str, dict] = {}
    with open(log, "w", buffering=1) as out:  # line-buffered: a running build can be followed
        out.write(f"$ {' '.join(cmd)}\n# cwd {cwd}\n")
        for line in proc.stdout:
            out.write(line)
            line = line.rstrip("\n")
            if m := STEP_OK.match(line):
                kind, label, secs = m.group(1), m.group(2), float(m.group(3))
                step = open_steps.pop(f"{kind} {label}", None) or {"kind": kind, "label": label}
                step["seconds"] = secs
                steps.append(step)
                if current["step"] is step:
                    current["step"] = None
            elif m := STEP_START.match(line):
                step = {"kind": m.group(1), "label": m.group(2)}
                open_steps[f"{step['kind']} {step['label']}"] = step
                current["step"] = step
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    done.set()
    sampler.join()
    for step in steps:
        if "sampled_peak_rss_kib" in step:
            step["sampled_peak_rss_gb"] = round(step.pop("sampled_peak_rss_kib") * 1024 / 1e9, 3)
    failed = [{"kind": s["kind"], "label": s["label"]} for s in open_steps.values()]
    return {
        "cmd": cmd, "returncode": proc.returncode, "wall_s": round(wall, 2),
        "peak_rss_kib": usage.ru_maxrss, "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3),
        "user_s": round(usage.ru_utime, 1), "sys_s": round(usage.ru_stime, 1),
        "sampled_peak_rss_gb": round(samples["max_kib"] * 1024 / 1e9, 3),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "steps": steps, "unfinished_steps": failed, "log": str(log),
    }


def by_kind(steps: list[dict]) -> dict:
    out: dict[str, float] = {}
    for s in steps:
        out[s["kind"]] = round(out.get(s["kind"], 0.0) + s["seconds"], 1)
    return out


def _check(run: dict, what: str) -> None:
    if run["returncode"] != 0:
        tail = Path(run["log"]).read_text().splitlines()[-30:]
        raise SystemExit(f"{what} failed (exit {run['returncode']}); log {run['log']}:\n"
                         + "\n".join(tail))


# Re-runs one planned step alone in a fresh interpreter (its cache entry removed first).
STEP_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
t0 = time.monotonic()
from mlxbuild.build import plan_manifests
from mlxbuild.cache import Cache
from mlxbuild.settings import Roots
from mlxbuild.tasks import run_step
import torch, executorch.exir  # noqa: F401  imports are not the step's cost
roots = Roots(Path(sys.argv[2]), Path(sys.argv[3]))
step = plan_manifests([sys.argv[1]], roots).steps[sys.argv[4]]
Cache(roots.cache).remove(step.kind, step.key)
if step.kind != "package":
    from mlxbuild.stages import stage
    stage(step.kind)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r0, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
ok = run_step(step, roots)
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"step": step.name, "kind": step.kind, "ok": ok is True,
                  "wall_s": round(time.monotonic() - t1, 1),
                  "cpu_s": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 1),
                  "peak_rss_gb": round(r1.ru_maxrss * 1024 / 1e9, 3),
                  "rss_before_step_gb": round(rss0 * 1024 / 1e9, 3),
                  "imports_s": round(t1 - t0, 1)}))
"""


def profile_steps(manifest: Path, root: Path, env: dict) -> list[dict]:
    """Each step of an already-built ``manifest`` re-run alone in a fresh process.

    In a build every step shares one process, so a step's sampled RSS includes
    what earlier steps left behind; this isolates each step's own peak.
    """
    code = ("import json, sys\nfrom pathlib import Path\n"
            "from mlxbuild.build import plan_manifests\nfrom mlxbuild.settings import Roots\n"
            "plan = plan_manifests([sys.argv[1]], Roots(Path(sys.argv[2]), Path(sys.argv[3])))\n"
            "print(json.dumps(list(plan.steps)))\n")
    benv = build_env(env, root)
    args = [str(manifest), benv["MLXBUILD_CACHE"], benv["MLXBUILD_ARTIFACTS"]]
    names = json.loads(subprocess.run([sys.executable, "-c", code, *args], env=benv, check=True,
                                      capture_output=True, text=True).stdout)
    out = []
    for name in names:
        r = subprocess.run([sys.executable, "-c", STEP_CHILD, *args, name], cwd=root, env=benv,
                           capture_output=True, text=True)
        lines = r.stdout.strip().splitlines()
        out.append(json.loads(lines[-1]) if r.returncode == 0 and lines
                   else {"step": name, "ok": False, "error": r.stderr[-2000:]})
    return out


# --------------------------------------------------------------------------- setup


def snapshot_code(mode: str, dest: Path) -> dict:
    """Copy the mlxbuild and delegate packages to ``dest`` (put first on PYTHONPATH)."""
    dest.mkdir(parents=True, exist_ok=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--short", "--", "mlxbuild", "backends", "mlx_runtime"], cwd=REPO,
                           capture_output=True, text=True).stdout.splitlines()
    if mode == "head":
        archive = subprocess.run(["git", "archive", "HEAD", "mlxbuild", "backends", "mlx_runtime"], cwd=REPO,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    else:
        for pkg in ("mlxbuild", "backends", "mlx_runtime"):
            shutil.copytree(REPO / pkg, dest / pkg,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return {"mode": mode, "head": head, "dirty_files_not_measured" if mode == "head"
            else "dirty_files_measured": dirty}


def base_env(code: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"  # reporter lines arrive when printed: steps get their RSS
    env["HF_HUB_OFFLINE"] = "1"
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    return env


def build_env(env: dict, root: Path) -> dict:
    return {**env, "MLXBUILD_CACHE": str(root / "cache"),
            "MLXBUILD_ARTIFACTS": str(root / "artifacts")}


def doit_build(manifest: Path, root: Path, env: dict, log: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    report = root / f"report-{log.stem}.json"
    run = measure([str(VENV_BIN / "doit"), "build", "--report", str(report), str(manifest)], root,
                  build_env(env, root), log)
    # Each heavy step runs in a process of its own, whose peak the build report records
    # (the sampler above sees only the doit process).
    if report.exists():
        data = json.loads(report.read_text())
        run["step_peaks_mb"] = {f"{s['step']} {t['target']}": s.get("peak_rss_mb")
                                for m in data.get("manifests", []) for t in m["targets"] for s in t["steps"]
                                if s.get("peak_rss_mb")}
    return run


def pte_sizes(artifacts: Path) -> dict:
    return {p.name: p.stat().st_size for p in sorted(artifacts.rglob("*.pt[ed]"))}


def changed_manifest(data: dict, target: str) -> tuple[dict, str]:
    """A copy of ``data`` whose ``target`` uses a new scheme: same, but another linear group size."""
    data = json.loads(json.dumps(data))
    t = next((t for t in data["targets"] if t["name"] == target), None)
    if t is None:
        raise SystemExit(f"--change-target {target!r} is not a target of the manifest")
    scheme = json.loads(json.dumps(data["quantization"][t["quantization"]]))
    linear = scheme.get("linear") or {}
    if linear.get("format", "affine") != "affine":
        raise SystemExit(f"--change-target {target!r}: its linear layers are not affine")
    old = linear.get("group_size", 32)
    linear["group_size"] = 128 if old != 128 else 64
    name = f"{t['quantization']}-changed"
    data["quantization"][name] = scheme
    what = f"{target}: scheme {t['quantization']!r} -> {name!r} (linear group_size {old} -> {linear['group_size']})"
    t["quantization"] = name
    return data, what


def only_target(data: dict, target: str) -> dict:
    data = json.loads(json.dumps(data))
    data["targets"] = [t for t in data["targets"] if t["name"] == target]
    if not data["targets"]:
        raise SystemExit(f"--compare-target {target!r} is not a target of the manifest")
    return data


def et_flags(data: dict, target: str) -> list[str]:
    """export_llm_hf.py flags equivalent to ``target`` of the manifest (MLX, affine/nvfp4)."""
    t = next(t for t in data["targets"] if t["name"] == target)
    if t["backend"] != "mlx":
        raise SystemExit(f"--compare-target {target!r}: ExecuTorch's script builds MLX targets only")
    scheme = data["quantization"].get(t.get("quantization", "none"), {})
    flags = ["--dtype", data["model"].get("dtype", "fp32"),
             "--max-ctx-len", str(data["export"]["max_context_length"]),
             "--prefill-chunk-size",
             str(data["export"].get("max_prefill_chunk") or data["export"]["max_context_length"]),
             "--use-custom-sdpa", "--use-custom-kv-cache"]
    for kind, flag in (("linear", "--qlinear"), ("embedding", "--qembedding")):
        rule = scheme.get(kind)
        if not rule or rule.get("format", "affine") == "none":
            continue
        if rule.get("format") == "nvfp4":
            flags += [flag, "nvfp4"]
            continue
        flags += [flag, f"{rule['bits']}w"]
        group = rule.get("group_size", 32)
        if group == "per_channel":
            if rule["bits"] != 8:  # the script only does per-channel as its 8w default
                raise SystemExit(f"{target}: export_llm_hf.py has no per-channel {rule['bits']}w")
            continue
        flags += [f"{flag}-group-size", str(group)]
    return flags


def host_info() -> dict:
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) * 1024 / 1e9, 1)
    except OSError:
        pass
    versions = {}
    from importlib import metadata

    for name in ("torch", "executorch", "torchao", "transformers", "doit"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "mem_total_gb": mem, "versions": versions}


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    p.add_argument("--output", type=Path, default=None,
                   help="results JSON (default benchmarks/results/build-<date>.json)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="working directory (default: a fresh temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    p.add_argument("--code", choices=("head", "worktree"), default="head",
                   help="which mlxbuild code to measure (default: the committed HEAD)")
    p.add_argument("--noop-runs", type=int, default=5)
    p.add_argument("--change-target", default="mlx-8w",
                   help="target whose scheme the one-target-change rebuild edits")
    p.add_argument("--compare-target", default="mlx-4w",
                   help="target built alone and with ExecuTorch's export_llm_hf.py")
    p.add_argument("--no-compare", action="store_true", help="skip the side-by-side")
    p.add_argument("--only-compare", action="store_true",
                   help="only the side-by-side (a cold build of --compare-target, then ET's script)")
    p.add_argument("--profile-steps", action="store_true",
                   help="after the side-by-side, re-run each of its steps alone in a fresh "
                        "process (own wall, CPU and peak RSS per step; ~6 min more)")
    p.add_argument("--note", default="", help="free text stored in the results")
    args = p.parse_args(argv)

    today = dt.date.today().isoformat()
    output = args.output or REPO / "benchmarks" / "results" / f"build-{today}.json"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mlxbuild-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    manifest_text = args.manifest.read_text()
    data = yaml.safe_load(manifest_text)
    code = snapshot_code(args.code, work / "code")
    env = base_env(work / "code")

    results: dict = {
        "benchmark": "mlxbuild build", "date": dt.datetime.now().isoformat(timespec="seconds"),
        "manifest": str(args.manifest.resolve().relative_to(REPO)
                        if args.manifest.resolve().is_relative_to(REPO) else args.manifest),
        "manifest_sha256": hashlib.sha256(manifest_text.encode()).hexdigest(),
        "targets": [t["name"] for t in data["targets"]], "code": code, "host": host_info(),
        "workdir": str(work), "note": args.note,
        "units": {"wall": "seconds", "peak_rss_gb": "1e9 bytes (ru_maxrss KiB * 1024 / 1e9)"},
    }

    def save():
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=1) + "\n")

    def say(msg):
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    weights_dir = None
    full = work / "full"
    if not args.only_compare:
        manifest = work / "manifest.yaml"
        manifest.write_text(manifest_text)
        say(f"cold build of {len(data['targets'])} targets in {full}")
        cold = doit_build(manifest, full, env, logs / "cold.log")
        _check(cold, "cold build")
        cold["by_kind"] = by_kind(cold["steps"])
        cold["pte_bytes"] = pte_sizes(full / "artifacts")
        results["cold"] = cold
        save()
        say(f"cold: {cold['wall_s']} s, peak RSS {cold['peak_rss_gb']} GB")

        runs = []
        for i in range(args.noop_runs):
            r = doit_build(manifest, full, env, logs / f"noop-{i}.log")
            _check(r, "no-op build")
            runs.append(r)
        results["noop"] = {
            "runs_s": [r["wall_s"] for r in runs],
            "median_s": round(statistics.median(r["wall_s"] for r in runs), 2),
            "steps_run": sorted({f"{s['kind']} {s['label']}" for r in runs for s in r["steps"]}),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
        }
        save()
        say(f"no-op: median {results['noop']['median_s']} s")

        if args.change_target:
            changed, what = changed_manifest(data, args.change_target)
            cm = work / "manifest-changed.yaml"
            cm.write_text(yaml.safe_dump(changed, sort_keys=False))
            say(f"one-target change: {what}")
            ch = doit_build(cm, full, env, logs / "change.log")
            _check(ch, "one-target-change build")
            ch["change"] = what
            ch["by_kind"] = by_kind(ch["steps"])
            results["one_target_change"] = ch
            save()
            say(f"change: {ch['wall_s']} s")
        found = sorted((full / "cache" / "weights").glob("*/*/config.json"))
        weights_dir = found[0].parent if found else None

    if not args.no_compare:
        target = args.compare_target
        sbs = work / "compare"
        m1 = work / f"manifest-{target}.yaml"
        m1.write_text(yaml.safe_dump(only_target(data, target), sort_keys=False))
        say(f"cold build of {target} alone in {sbs}")
        ours = doit_build(m1, sbs, env, logs / f"compare-{target}.log")
        _check(ours, f"{target} build")
        ours["by_kind"] = by_kind(ours["steps"])
        ours["pte_bytes"] = pte_sizes(sbs / "artifacts")
        if weights_dir is None:
            found = sorted((sbs / "cache" / "weights").glob("*/*/config.json"))
            weights_dir = found[0].parent
        # ExecuTorch's script gets the same synthetic weights as a plain HF folder.
        hf = work / "hf-weights"
        if not hf.exists():
            shutil.copytree(weights_dir, hf, ignore=shutil.ignore_patterns("source.json", ".complete"))
        et_out = work / "et" / f"{target}.pte"
        et_out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-c", ET_WRAPPER, "--model-id", str(hf), "--output", str(et_out),
               *et_flags(data, target)]
        say(f"ExecuTorch export_llm_hf: {' '.join(cmd[3:])}")
        et = measure(cmd, work / "et", env, logs / "et.log")
        _check(et, "export_llm_hf")
        et["pte_bytes"] = et_out.stat().st_size
        weights_s = sum(s["seconds"] for s in ours["steps"] if s["kind"] == "weights")
        results["side_by_side"] = {
            "target": target, "ours": ours, "executorch_export_llm_hf": et,
            "ratio_ours_over_et": {
                "wall": round(ours["wall_s"] / et["wall_s"], 2),
                "wall_excluding_weights_step": round((ours["wall_s"] - weights_s) / et["wall_s"], 2),
                "peak_rss": round(ours["peak_rss_kib"] / et["peak_rss_kib"], 2),
                # CPU time (user + sys) is steadier than wall on a shared machine.
                "cpu": round((ours["user_s"] + ours["sys_s"]) / (et["user_s"] + et["sys_s"]), 2),
            },
            "et_reference_from_issue": ET_REFERENCE,
            "notes": ("ours = `doit build` of a manifest copy holding only this target, fresh cache: "
                      "it also makes the synthetic weights (the weights step; ET's script starts "
                      "from the saved folder), computes eager reference logits and verifies the "
                      "artifact (numerically, through the MLX delegate runtime)."),
        }
        save()
        r = results["side_by_side"]["ratio_ours_over_et"]
        say(f"ours {ours['wall_s']} s / {ours['peak_rss_gb']} GB; ET {et['wall_s']} s / "
            f"{et['peak_rss_gb']} GB; ratio wall {r['wall']} rss {r['peak_rss']}")
        if args.profile_steps:
            say("profiling each step of the side-by-side build alone")
            results["side_by_side"]["step_profile"] = profile_steps(m1, sbs, env)
            save()

    results["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    save()
    say(f"wrote {output}")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
