"""Heavy steps in processes of their own (mlxbuild.child): the same bytes as in-process,
the kernel-measured peak memory per step in the report, errors that come back by class
(a crash's traceback in the step's log, a verification failure's exit 4), and the size
rule that keeps tiny models in-process. About 2 minutes on 2 cores."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from buildlog import TINY_SOURCE, doit_command
from mlxbuild import child

MANIFEST = f"""\
name: proc
version: 0.1.0
model:
{TINY_SOURCE}  dtype: fp32
export: {{max_context_length: 32}}
quality: {{enabled: false}}  # not what these tests measure; each of its steps is a child start in "always"
quantization:
  4w: {{linear: {{bits: 4, group_size: 32}}}}
targets:
  - {{name: mlx-4w, backend: mlx, quantization: 4w}}
  - {{name: portable-fp32, backend: portable}}
"""
BROKEN = """\
name: broken
version: 0.1.0
model:
  source: {module: "proc_broken_factory:make"}
  dtype: fp32
export: {max_context_length: 32}
targets:
  - {name: portable-fp32, backend: portable}
"""


def _build(root: Path, env_for, mode: str, *args: str, manifest: str = "m.yaml"):
    env = env_for(MLXBUILD_CACHE=root / "cache", MLXBUILD_ARTIFACTS=root / "artifacts", MLXBUILD_STEP_PROCESS=mode)
    return subprocess.run([*doit_command(), "build", "--report", "r.json", *args, manifest], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def both(tmp_path_factory, subprocess_env):
    out = {}
    for mode in ("never", "always"):
        root = tmp_path_factory.mktemp(mode)
        (root / "m.yaml").write_text(MANIFEST)
        p = _build(root, subprocess_env, mode)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        out[mode] = root
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_child_steps_give_the_same_bytes(both):
    for name in ("proc-mlx-4w.pte", "proc-portable-fp32.pte", "proc-portable-fp32.bpte"):
        a, b = (both[m] / "artifacts" / "proc" / "0.1.0" / name for m in ("never", "always"))
        assert _sha(a) == _sha(b), name


def test_report_has_each_child_steps_measured_peak(both):
    def peaks(root):
        report = json.loads((root / "r.json").read_text())
        return {(t["target"], s["step"]): s.get("peak_rss_mb") for t in report["manifests"][0]["targets"]
                for s in t["steps"]}

    always, never = peaks(both["always"]), peaks(both["never"])
    for (target, step), peak in always.items():
        if step in child.HEAVY:
            # a process that imported torch: more than 100 MB, less than this machine has
            assert peak is not None and 100 < peak < 16_000, (target, step, peak)
        else:
            assert peak is None, (target, step)
    assert all(v is None for v in never.values())


def test_a_crash_in_a_child_is_a_few_lines_and_a_log(tmp_path, subprocess_env):
    (tmp_path / "m.yaml").write_text(BROKEN)
    (tmp_path / "proc_broken_factory.py").write_text(
        'def make(**kwargs):\n    raise RuntimeError("factory exploded in a child")\n')
    def env_for(**kw):
        env = subprocess_env(**kw)
        env["PYTHONPATH"] += os.pathsep + str(tmp_path)  # the broken factory
        return env

    p = _build(tmp_path, env_for, "always")
    assert p.returncode == 1, p.stdout + p.stderr
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if "factory exploded" in ln]
    assert lines and "RuntimeError: factory exploded in a child" in lines[0], p.stdout + p.stderr
    [log] = (tmp_path / "cache" / "logs").glob("weights-*.log")
    text = log.read_text()
    assert "proc_broken_factory.py" in text and "Traceback" in text  # the child's own traceback
    assert not list((tmp_path / "cache").glob("weights/*/*/.complete"))


def test_a_verification_failure_in_a_child_exits_4(both, tmp_path, subprocess_env):
    import shutil

    root = tmp_path / "w"
    shutil.copytree(both["never"], root)
    for entry in (root / "cache" / "reference").glob("*/*"):
        logits = np.load(entry / "logits.npy")
        logits[:, ::7] += np.abs(logits).max()
        np.save(entry / "logits.npy", logits)
        from mlxbuild.cache import COMPLETE, inventory

        (entry / COMPLETE).write_text(json.dumps({"format": 1, "files": inventory(entry)}))
    for entry in (root / "cache" / "verify").glob("*/*"):
        shutil.rmtree(entry)
    for rec in (root / "artifacts" / "proc" / "0.1.0").glob("*.json"):
        data = json.loads(rec.read_text())
        if "package_key" in data:
            data["package_key"] = "0" * 64
            rec.write_text(json.dumps(data))
    p = _build(root, subprocess_env, "always", "--target", "proc/portable-fp32")
    assert p.returncode == 4, p.stdout[-2000:] + p.stderr[-2000:]
    assert "verification failed: max abs error" in p.stdout + p.stderr


def test_the_size_rule(monkeypatch):
    def step(kind, config):
        load = {"synthetic": {"architecture": "qwen3", "config": config}}
        return SimpleNamespace(kind=kind, params=SimpleNamespace(load=load, dtype="bf16"))

    tiny = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    # Qwen3-0.6B's shapes: ~0.6e9 parameters, 1.2 GB in bf16
    qwen06 = {"vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
              "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128}
    assert 0.5e9 < child._synthetic_params(qwen06) < 0.7e9
    monkeypatch.delenv(child.MODE_ENV, raising=False)
    assert not child.wanted(step("weights", tiny), None)
    assert child.wanted(step("weights", qwen06), None)
    assert not child.wanted(step("package", qwen06), None)  # not a heavy step
    monkeypatch.setenv(child.MODE_ENV, "never")
    assert not child.wanted(step("weights", qwen06), None)
    monkeypatch.setenv(child.MODE_ENV, "sometimes")
    from mlxbuild.errors import UsageError

    with pytest.raises(UsageError, match="MLXBUILD_STEP_PROCESS='sometimes': expected auto, always or never"):
        child.mode()
