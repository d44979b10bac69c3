"""The locked toolchain: the lock against pyproject's ranges, `mlxbuild doctor`, the check at
the start of every build, the transformers 5.24 cache call, and what a crashed step prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from mlxbuild import toolchain

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements" / "lock.txt"
BIN = Path(sys.executable).parent


def _requirements():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for r in project["optional-dependencies"]["test"]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate()]


def test_lock_pins_every_requirement_inside_pyproject_ranges():
    pins = toolchain.read_lock(LOCK)
    assert len(pins) > 50  # transitive: everything the install pulls in
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in the lock"
        assert req.specifier.contains(Version(pins[name]).public, prereleases=True), (
            f"lock {name}=={pins[name]} is outside pyproject's {req}")
        for extra in req.extras:  # what the extra pulls in (mlx[cpu] → mlx-cpu), pinned too
            pulled = [Requirement(r) for r in metadata.requires(req.name) or []]
            wanted = [r for r in pulled if r.marker is not None and r.marker.evaluate({"extra": extra})
                      and not r.marker.evaluate({"extra": ""})]
            assert wanted, f"{req.name}[{extra}] pulls in nothing"
            for r in wanted:
                assert canonicalize_name(r.name) in pins, f"{r.name} (from {req.name}[{extra}]) is not in the lock"


def test_tested_set_starts_with_the_lock():
    pins = toolchain.read_lock(LOCK)
    for package in toolchain.WATCHED:
        assert Version(pins[package]).public == toolchain.TESTED[package][0], package


def test_the_running_environment_is_the_lock():
    """The suite runs in an install made through the lock (CI and the README's commands)."""
    assert toolchain.lock_drift(LOCK) == []


def test_ci_installs_through_the_lock_and_checks_it(tmp_path):
    script = (REPO / ".ci" / "run").read_text()
    assert "pip install -c requirements/lock.txt -e '.[test]'" in script and "CI=" in script
    readme = (REPO / "README.md").read_text()
    assert readme.count("pip install -c requirements/lock.txt -e '.[test]'") == 2
    # With CI set, a drifted install stops pytest before any test, with a non-zero exit.
    (tmp_path / "test_x.py").write_text("def test_x():\n    pass\n")
    (tmp_path / "conftest.py").write_text(
        "from mlxbuild import toolchain\n"
        "toolchain.lock_drift = lambda path: ['doit: locked 0.36.0, installed 0.37.0']\n"
        "from conftest_repo import pytest_sessionstart\n")
    (tmp_path / "conftest_repo.py").write_text((REPO / "tests" / "conftest.py").read_text())
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                       cwd=tmp_path, env={**os.environ, "CI": "true"}, capture_output=True, text=True)
    assert p.returncode == 3 and "differ from requirements/lock.txt: doit" in p.stdout + p.stderr, p


def test_lock_drift_names_package_and_versions(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("# comment\ndoit==0.36.0\n    # via mlxbuild\nmlxbuild-no-such-dist==1.0\n"
                    "numpy==99.0 ; sys_platform == 'nonesuch'\n")
    drift = toolchain.lock_drift(lock)
    assert drift == ["doit: locked 0.36.0, installed 0.37.0",
                     "mlxbuild-no-such-dist: locked 1.0, not installed"]
    p = subprocess.run([str(BIN / "mlxbuild"), "doctor", "--lock", str(lock)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "error: doit: locked 0.36.0, installed 0.37.0" in p.stderr, p


def test_read_lock_refuses_an_unpinned_line(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("doit==0.37.0\nnumpy>=2\n")
    with pytest.raises(toolchain.UsageError, match=r"lock.txt:2: not a pinned requirement: numpy>=2"):
        toolchain.read_lock(lock)


@pytest.fixture
def fake_versions(monkeypatch):
    """Installed versions as the test says, the rest as installed."""
    real = toolchain.installed_version
    fake = {}
    monkeypatch.setattr(toolchain, "installed_version", lambda p: fake.get(p, real(p)))
    monkeypatch.setattr(toolchain.check, "_warned", False, raising=False)
    toolchain._checked.cache_clear()
    yield fake
    toolchain._checked.cache_clear()


def test_doctor_is_clean_in_the_locked_environment(capsys):
    assert toolchain.main() == 0
    out = capsys.readouterr()
    assert "warning" not in out.out + out.err and "ok: transformers 5.23.0" in out.out


def test_doctor_warns_outside_the_tested_set(fake_versions, capsys):
    fake_versions["numpy"] = "2.5.0"
    assert toolchain.main() == 0
    out = capsys.readouterr().out
    assert "warning: numpy 2.5.0 is outside the tested set (tested: 2.4.6)" in out.splitlines()


def test_doctor_refuses_a_known_break(fake_versions, capsys):
    fake_versions["transformers"] = "4.57.6"
    assert toolchain.main(as_json=True) == 2
    report = json.loads(capsys.readouterr().out)
    [row] = [r for r in report["packages"] if r["package"] == "transformers"]
    assert report["ok"] is False and row["status"] == "error" and row["installed"] == "4.57.6"
    assert "known to break builds" in row["message"]


def test_local_version_labels_count_as_the_public_version(fake_versions):
    fake_versions["torch"] = "2.13.0+cu130"
    assert {f.package: f.level for f in toolchain.findings()}["torch"] == "ok"
    fake_versions["torch"] = "2.11.0+cu130"
    assert {f.package: f.level for f in toolchain.findings()}["torch"] == "error"


def test_build_start_refuses_before_any_step(fake_versions, tmp_path, monkeypatch, capsys):
    from mlxbuild.cli import main

    fake_versions["executorch"] = "1.4.0"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLXBUILD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLXBUILD_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    assert main(["build", str(REPO / "manifests" / "qwen.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: executorch 1.4.0 is known to break builds"), err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "artifacts").exists()


def test_build_start_warns_once_and_builds_on(fake_versions, capsys):
    fake_versions["doit"] = "0.38.0"
    toolchain.check()
    toolchain.check()
    err = capsys.readouterr().err
    assert err.count("warning: doit 0.38.0 is outside the tested set") == 1


# -- transformers 5.24's cache call


def test_mlx_cache_takes_the_kwargs_form():
    """transformers 5.24 calls cache.update(k, v, layer_idx, kwargs=...); ExecuTorch 1.5.1's
    HFStaticCache alone refuses it, the MLX flavour's cache takes it."""
    import torch
    from transformers import Qwen3Config

    from backends.flavours import mlx
    from backends.mlx_schema import ensure_mlx_schema

    ensure_mlx_schema()
    from executorch.backends.mlx.llm.cache import HFStaticCache

    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    cache = HFStaticCache(config, max_batch_size=1, max_cache_len=8, dtype=torch.float32)
    k = torch.ones(1, 1, 2, 16)
    with pytest.raises(TypeError):
        cache.update(k, k, 0, kwargs={})
    mlx._accept_call_kwargs(cache)
    keys, _ = cache.update(k, 2 * k, 0, kwargs={"position_ids": None})
    assert keys.shape[-2] == 8 and torch.equal(keys[0, 0, :2], k[0, 0])


@pytest.mark.slow
def test_default_build_under_transformers_5_24(tmp_path, subprocess_env):
    """Every text export flavour (mlx, et-llm-ops, plain) built, lowered and verified under
    transformers 5.24.0, installed beside the locked environment (about 3 minutes)."""
    site = tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                        "transformers==5.24.0"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    env = subprocess_env(MLXBUILD_CACHE=tmp_path / "cache", MLXBUILD_ARTIFACTS=tmp_path / "artifacts")
    env["PYTHONPATH"] = f"{env['PYTHONPATH']}:{site}"
    probe = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                           env=env, capture_output=True, text=True)
    assert probe.stdout.strip() == "5.24.0", probe
    p = subprocess.run([str(BIN / "doit"), "build", str(REPO / "manifests" / "qwen.yaml")], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "warning: transformers 5.24.0" not in p.stderr  # 5.24.0 is in the tested set
    for flavour in ("4w/mlx", "8da4w/et-llm-ops", "none/plain"):
        assert f"ok export qwen3-tiny {flavour}" in p.stdout, p.stdout
    for target in ("mlx-4w", "xnnpack-8da4w", "portable-fp32"):
        record = json.loads((tmp_path / "artifacts" / "qwen3-tiny" / "0.1.0" / f"qwen3-tiny-{target}.json").read_text())
        assert record["verification"]["passed"] is True, target


# -- a crashed step


FACTORY = ('def helper():\n    raise RuntimeError("factory exploded on purpose\\n' + "detail\\n" * 20 + '")\n'
           'def make(**kwargs):\n    helper()\n')
BROKEN = """\
name: crash
version: 0.1.0
model:
  source: {module: "crash_factory:make"}
  dtype: fp32
export: {max_context_length: 32}
targets:
  - {name: portable-fp32, backend: portable, quantization: none}
"""


@pytest.fixture
def crash(tmp_path, subprocess_env):
    (tmp_path / "crash_factory.py").write_text(FACTORY)
    (tmp_path / "broken.yaml").write_text(BROKEN)
    env = subprocess_env(MLXBUILD_CACHE=tmp_path / "cache", MLXBUILD_ARTIFACTS=tmp_path / "artifacts")
    env["PYTHONPATH"] += f":{tmp_path}"

    def run(*extra, **env_extra):
        return subprocess.run([str(BIN / "doit"), "build", *extra, "broken.yaml"], cwd=tmp_path,
                              env={**env, **env_extra}, capture_output=True, text=True, timeout=300)

    return tmp_path, run


def test_a_crashed_step_prints_a_few_lines_and_a_log(crash):
    root, run = crash
    p = run()
    assert p.returncode == 1
    out = (p.stdout + p.stderr).strip().splitlines()
    assert len(out) <= 8, out
    assert "Traceback" not in p.stdout + p.stderr
    [fail] = [ln for ln in out if ln.startswith("FAIL ")]
    assert fail == "FAIL weights crash (fp32): RuntimeError: factory exploded on purpose"
    [log_line] = [ln for ln in out if "full traceback:" in ln]
    log = Path(log_line.split("full traceback:", 1)[1].strip())
    assert log.parent == root / "cache" / "logs"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "in helper" in text
    assert "detail\n" * 20 in text  # the whole message is in the log
    assert not list((root / "cache").glob("weights/*"))  # no half-written entry


def test_verbose_2_and_debug_show_the_traceback(crash):
    _, run = crash
    for p in (run("-v", "2"), run(MLXBUILD_DEBUG="1")):
        assert p.returncode == 1
        assert "Traceback (most recent call last)" in p.stdout + p.stderr and "in helper" in p.stdout + p.stderr


def test_a_break_accepted_by_name_is_a_warning(fake_versions, monkeypatch, capsys):
    """The CUDA builder's image has only torch 2.11+cu130: its script accepts that break by
    name; any other break is still refused."""
    fake_versions["torch"] = "2.11.0+cu130"
    with pytest.raises(toolchain.UsageError, match="torch 2.11.0"):
        toolchain.check()
    monkeypatch.setenv(toolchain.ACCEPT_ENV, "torch")
    toolchain.check()
    err = capsys.readouterr().err
    assert "warning: torch 2.11.0+cu130 is known to break builds" in err and toolchain.ACCEPT_ENV in err
    fake_versions["executorch"] = "1.4.0"
    toolchain._checked.cache_clear()
    with pytest.raises(toolchain.UsageError, match="executorch 1.4.0") as e:
        toolchain.check()
    assert "torch 2.11" not in str(e.value)
