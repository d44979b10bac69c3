"""Shared test fixtures (keep them generic: several test modules use this file)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_sessionstart(session):
    """In CI, an install that is not the lock fails the run before any test: a green run
    must mean the locked environment passed (a developer's venv may drift; it is tested
    by tests/test_toolchain.py there)."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        from mlxbuild.toolchain import lock_drift

        drift = lock_drift(REPO / "requirements" / "lock.txt")
        if drift:
            pytest.exit("installed packages differ from requirements/lock.txt: " + "; ".join(drift),
                        returncode=3)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS, tests/s3server.py) for the module: its `env` is the AWS
    environment a client needs."""
    from s3server import running

    with running(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture(scope="session")
def frozen_source(tmp_path_factory) -> Path:
    """A copy of our packages (`mlxbuild`, `backends`, `mlx_runtime`) as they are when the session starts.

    Cache keys include a hash of our own source files, and the repository is edited
    while tests run; subprocesses that put this directory first on PYTHONPATH (see
    `subprocess_env`) all see one version of the code, so a warm cache built early
    in the session stays warm. The editable install's finder comes after PYTHONPATH,
    and doit's entry points name modules, not paths, so plugins load from here too.
    """
    root = tmp_path_factory.mktemp("src")
    for package in ("mlxbuild", "backends", "mlx_runtime"):
        shutil.copytree(REPO / package, root / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root


@pytest.fixture(scope="session")
def subprocess_env(frozen_source):
    """Build an environment for a subprocess running the frozen source: `subprocess_env(**overrides)`."""

    def make(**overrides: str) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("MLXBUILD_DEBUG", None)
        # A CI job running this suite must not collect every test build's summary table.
        env.pop("GITHUB_STEP_SUMMARY", None)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(frozen_source)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.update({k: str(v) for k, v in overrides.items()})
        return env

    return make
