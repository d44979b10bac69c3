"""`doit build --executor ray`: a real Ray cluster on loopback (a head node that runs no steps
and two worker nodes, each with its own cache, so they behave like separate machines) and
the SeaweedFS S3 server the remote-cache tests use. Builds run as subprocesses on the frozen
source, as a user runs them; each test uses its own bucket prefix and, where it must build
from nothing, its own model seed.

About 3 minutes on 2 cores: the cluster starts in ~20 s; the matrix build through Ray and
the local build it is compared with take most of the rest. The killed-driver case is
`-m slow` (~1 minute more).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from raycluster import running as ray_cluster
from s3server import BUCKET, free_ports

REPO = Path(__file__).resolve().parent.parent
NAME, VERSION = "qwen3-tiny", "0.1.0"


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory, subprocess_env):
    env = subprocess_env(**s3.env)
    for k in ("MLXBUILD_CACHE", "MLXBUILD_ARTIFACTS", "MLXBUILD_REMOTE_CACHE"):
        env.pop(k, None)
    with ray_cluster(tmp_path_factory.mktemp("ray"), env, workers=2) as c:
        yield c


@dataclass
class Run:
    rc: int
    out: str
    err: str
    root: Path

    @property
    def report(self) -> dict:
        return json.loads((self.root / "report.json").read_text())

    def steps(self) -> list[dict]:
        return [s for m in self.report["manifests"] for t in m["targets"] for s in t["steps"]]

    def __str__(self):
        return f"exit {self.rc}\n--- stdout\n{self.out[-4000:]}\n--- stderr\n{self.err[-4000:]}"


def _machine(root: Path, seed: int | None = None, targets: tuple[str, ...] = ()) -> Path:
    """A working directory with the default manifest (optionally another seed, fewer targets)."""
    (root / "manifests").mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load((REPO / "manifests/qwen.yaml").read_text())
    if seed is not None:
        data["model"]["source"]["synthetic"]["seed"] = seed
    if targets:
        data["targets"] = [t for t in data["targets"] if t["name"] in targets]
    (root / "manifests/qwen.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return root


def _command(root: Path, executor: str | None, prefix: str | None, subprocess_env, s3, *extra):
    env = subprocess_env(MLXBUILD_CACHE=root / "cache", MLXBUILD_ARTIFACTS=root / "artifacts",
                         MLXBUILD_PLAIN="1", **s3.env)
    env.pop("RAY_ADDRESS", None)
    env.pop("MLXBUILD_EXECUTOR", None)
    env["MLXBUILD_REMOTE_CACHE"] = f"s3://{BUCKET}/{prefix}" if prefix else "off"
    args = [str(Path(sys.executable).with_name("doit")), "build", "--report", "report.json"]
    if executor:
        args += ["--executor", executor]
    return args + list(extra) + ["manifests/qwen.yaml"], env


def _build(root, executor, prefix, subprocess_env, s3, *extra) -> Run:
    args, env = _command(root, executor, prefix, subprocess_env, s3, *extra)
    p = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    return Run(p.returncode, p.stdout, p.stderr, root)


def _artifacts(root: Path) -> dict[str, bytes]:
    folder = root / "artifacts" / NAME / VERSION
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _incomplete(cache: Path) -> list[Path]:
    """Entry folders without their completion marker (a half-written entry)."""
    kinds = ("weights", "tokenizer", "quantize", "export", "reference", "lower", "verify", "baseline", "quality")
    return [p for k in kinds for p in (cache / k).glob("*/*") if p.is_dir() and not (p / ".complete").exists()]


def test_executor_option_values():
    from doit.doit_cmd import DoitMain

    from mlxbuild.doit_plugin import _executor_value
    from mlxbuild.errors import UsageError
    from mlxbuild.ray_executor import ExecutorSpec, parse

    assert parse(None) == parse("local") == ExecutorSpec("local", None)
    assert parse("ray") == ExecutorSpec("ray", None)
    assert parse("ray=10.0.0.5:6379") == ExecutorSpec("ray", "10.0.0.5:6379")
    assert parse("auto=ray://head:10001") == ExecutorSpec("auto", "ray://head:10001")
    for bad in ("local=x", "ray=", "kubernetes"):
        with pytest.raises(UsageError, match="expected local, ray\\[=ADDRESS\\] or auto"):
            parse(bad)
    # doit lifts NAME=VALUE arguments out as variables before the command parses its options.
    rest = DoitMain().process_args(["--executor", "ray=10.0.0.5:6379", "-n", "2", "m.yaml"])
    assert rest == ["--executor", "-n", "2", "m.yaml"]
    assert _executor_value(rest) == ["--executor", "ray=10.0.0.5:6379", "-n", "2", "m.yaml"]
    rest = DoitMain().process_args(["m.yaml", "--executor", "auto"])
    assert _executor_value(rest) == ["m.yaml", "--executor", "auto"]


def test_matrix_through_ray_is_byte_identical_to_a_local_build(cluster, s3, tmp_path, subprocess_env):
    ray_dir = _machine(tmp_path / "driver")
    run = _build(ray_dir, f"ray={cluster.address}", "matrix", subprocess_env, s3)
    assert run.rc == 0, run
    steps = run.steps()
    ran = [s for s in steps if s["step"] != "package" and s["status"] == "ran"]
    assert ran and all(s.get("node") and s["attempts"] == 1 for s in ran), steps
    assert len({s["node"] for s in ran}) == 2, "both worker nodes ran steps"
    # The driver ran no step but the packages: its cache holds only what it fetched to publish.
    assert not (ray_dir / "cache" / "weights").exists() and not (ray_dir / "cache" / "export").exists()
    assert all((c / "weights").exists() or (c / "lower").exists() for c in cluster.caches)
    # Progress lines as a local build prints them.
    assert any(line.startswith("ok lower qwen3-tiny/mlx-4w") for line in run.out.splitlines()), run

    local = _build(_machine(tmp_path / "local"), None, None, subprocess_env, s3, "-n", "2")
    assert local.rc == 0, local
    ours, theirs = _artifacts(ray_dir), _artifacts(tmp_path / "local")
    assert sorted(ours) == sorted(theirs) and any(n.endswith(".pte") for n in ours)
    assert [n for n in ours if ours[n] != theirs[n]] == []

    # A second Ray build is a no-op on the driver: nothing is submitted.
    again = _build(ray_dir, f"ray={cluster.address}", "matrix", subprocess_env, s3)
    assert again.rc == 0 and all(s["status"] == "up-to-date" for s in again.steps()), again

    # `auto` with no cluster at the address builds here, saying so once; `ray` refuses in one line.
    (closed,) = free_ports(1)
    auto = _build(tmp_path / "local", f"auto=127.0.0.1:{closed}", "matrix", subprocess_env, s3)
    assert auto.rc == 0, auto
    assert [ln for ln in auto.err.splitlines() if ln.startswith("note: --executor auto")] == [
        f"note: --executor auto: cannot reach a Ray cluster at 127.0.0.1:{closed}: Connection refused; "
        "building on this machine"]
    refused = _build(tmp_path / "local", f"ray=127.0.0.1:{closed}", "matrix", subprocess_env, s3)
    assert refused.rc == 2 and refused.err.strip().splitlines() == [
        f"error: cannot reach a Ray cluster at 127.0.0.1:{closed}: Connection refused"], refused
    offline = _build(tmp_path / "local", f"ray={cluster.address}", None, subprocess_env, s3)
    assert offline.rc == 2 and offline.err.strip().splitlines() == [
        "error: --executor ray: Ray workers exchange results through the remote cache; set "
        "settings.remote_cache in the manifest or MLXBUILD_REMOTE_CACHE"], offline


def test_worker_killed_mid_lower_is_retried_and_nothing_half_written(cluster, s3, tmp_path, subprocess_env):
    root = _machine(tmp_path, seed=11, targets=("portable-fp32",))
    args, env = _command(root, f"ray={cluster.address}", "killed-worker", subprocess_env, s3)
    proc = subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, deadline = None, time.monotonic() + 600
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        pids = cluster.worker_pids("lower qwen3-tiny/portable-fp32")
        if pids:
            time.sleep(0.5)  # into the lowering, not its first import
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.05)
    out, err = proc.communicate(timeout=900)
    run = Run(proc.returncode, out, err, root)
    assert killed is not None, f"no Ray worker ran the lower step\n{run}"
    assert run.rc == 0, run
    assert "lower qwen3-tiny/portable-fp32: its Ray worker died" in run.err and "retrying (2 of 3)" in run.err
    lower = next(s for s in run.steps() if s["step"] == "lower")
    assert lower["status"] == "ran" and lower["attempts"] == 2, lower
    record = json.loads((root / "artifacts" / NAME / VERSION / f"{NAME}-portable-fp32.json").read_text())
    assert record["verification"]["passed"] is True
    for cache in cluster.caches:
        assert _incomplete(cache) == []
    # Every remote entry is whole: its marker names an archive that is there.
    keys = s3.keys("killed-worker/")
    markers = [k for k in keys if k.endswith("/entry.json")]
    assert any("/lower/" in k for k in markers)
    for m in markers:
        assert m.rsplit("/", 1)[0] + "/" + json.loads(s3.get(m))["archive"] in keys


# slow: ~60 s (two builds of a fresh target through the cluster).
@pytest.mark.slow
def test_driver_killed_then_rerun_reuses_what_finished(cluster, s3, tmp_path, subprocess_env):
    root = _machine(tmp_path, seed=12, targets=("xnnpack-8da4w",))
    args, env = _command(root, f"ray={cluster.address}", "killed-driver", subprocess_env, s3)
    proc = subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("ok export "):
            proc.kill()
            break
    proc.wait(timeout=60)
    assert any(line.startswith("ok export ") for line in seen), "".join(seen)
    finished = {line.split()[1] for line in seen if line.startswith("ok ")}
    assert not (root / "artifacts" / NAME / VERSION).exists() or not list((root / "artifacts" / NAME / VERSION).glob("*.pte"))

    rerun = _build(root, f"ray={cluster.address}", "killed-driver", subprocess_env, s3)
    assert rerun.rc == 0, rerun
    by_kind = {s["step"]: s for s in rerun.steps()}
    for kind in finished:
        assert by_kind[kind]["cache"] in ("remote", "hit"), (kind, by_kind[kind])
    assert by_kind["lower"]["cache"] == "built" and by_kind["package"]["status"] == "ran"
