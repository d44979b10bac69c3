"""The toolchain a build runs with, against the set this project is tested on.

`mlxbuild doctor` prints it; every build checks it before any step (``check``):

- a package outside the tested set is one warning line (installed and tested versions);
- a version known to break a build (``BREAKS``, each with its reason) is an error, exit 2,
  before anything runs;
- ``mlxbuild doctor --lock requirements/lock.txt`` also compares every installed package
  with the lock (CI runs it after installing, so an install that drifted from the lock
  fails there rather than in a test).

``TESTED`` is the lock's version of each watched package (tests/test_toolchain.py keeps
the two equal) plus releases tested beside it; it lives in code because an installed
wheel of mlxbuild has no requirements/ folder. Reads package metadata only: no torch.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from mlxbuild.errors import UsageError

WATCHED = ("torch", "executorch", "torchao", "transformers", "mlx", "coremltools", "numpy", "doit")

# Versions the test suite has run against. The first of each is the lock's.
TESTED: dict[str, tuple[str, ...]] = {
    "torch": ("2.13.0",),
    "executorch": ("1.5.1",),
    "torchao": ("0.18.0",),
    # 5.24.0: every export flavour and the default build (tests/test_toolchain.py, slow).
    "transformers": ("5.23.0", "5.24.0"),
    "mlx": ("0.32.4",),
    "coremltools": ("9.0",),
    "numpy": ("2.4.6",),
    "doit": ("0.37.0",),
}


@dataclass(frozen=True)
class Break:
    package: str
    versions: str  # a PEP 440 specifier set
    reason: str


# Versions seen to break a build here, with what breaks. Refused before any step runs.
BREAKS: tuple[Break, ...] = (
    Break("transformers", "<5.0",
          "transformers 4.x does not import beside this stack (4.57.6 asks for tokenizers<=0.23.0 "
          "and huggingface_hub<1.0); every weights step fails"),
    Break("executorch", "!=1.5.*",
          "the MLX schema generation, the .pte reader and the lowering recipes follow "
          "ExecuTorch 1.5's APIs and flatbuffer schemas"),
    Break("torch", "!=2.13.*",
          "executorch 1.5.1's compiled kernels and pybindings are built against torch 2.13"),
)


@dataclass(frozen=True)
class Finding:
    package: str
    installed: str | None
    tested: tuple[str, ...]
    level: str  # "ok", "warning", "error"
    message: str

    def line(self) -> str:
        return f"{self.level}: {self.message}" if self.level != "ok" else f"ok: {self.message}"


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _parse(version: str):
    try:
        return Version(version)
    except InvalidVersion:
        return version


def _public(version: str) -> Version | None:
    try:
        return Version(Version(version).public)  # 2.13.0+cpu is 2.13.0
    except InvalidVersion:
        return None


def findings() -> list[Finding]:
    out = []
    for package in WATCHED:
        tested = TESTED[package]
        have = installed_version(package)
        if have is None:
            out.append(Finding(package, None, tested, "ok" if package == "coremltools" else "warning",
                               f"{package} is not installed (tested: {tested[0]})"))
            continue
        public = _public(have)
        broken = next((b for b in BREAKS if b.package == package and public is not None
                       and public in SpecifierSet(b.versions)), None)
        if broken:
            out.append(Finding(package, have, tested, "error",
                               f"{package} {have} is known to break builds: {broken.reason} "
                               f"(tested: {', '.join(tested)})"))
        elif public not in {_public(t) for t in tested}:
            out.append(Finding(package, have, tested, "warning",
                               f"{package} {have} is outside the tested set (tested: {', '.join(tested)})"))
        else:
            out.append(Finding(package, have, tested, "ok", f"{package} {have}"))
    return out


@lru_cache(maxsize=None)
def _checked() -> tuple[Finding, ...]:
    return tuple(findings())


# Packages whose known break a build host may accept on purpose, e.g. a CUDA builder whose
# image has only a CUDA torch of another release (benchmarks/cuda_on_device.sh): a comma
# list; each accepted break is still printed, as a warning, and the records name the
# versions the artifacts were built with.
ACCEPT_ENV = "MLXBUILD_ACCEPT_UNTESTED"


def _accepted() -> set[str]:
    import os

    return {canonicalize_name(n) for n in os.environ.get(ACCEPT_ENV, "").split(",") if n.strip()}


def check(stream=None) -> None:
    """The build-start check: warnings to ``stream`` (stderr), once per process; an
    error raises UsageError (exit 2) naming every refused package, unless ``ACCEPT_ENV``
    names it."""
    accepted = _accepted()
    found = tuple(Finding(f.package, f.installed, f.tested, "warning",
                          f.message + f" (accepted: {ACCEPT_ENV})")
                  if f.level == "error" and canonicalize_name(f.package) in accepted else f
                  for f in _checked())
    errors = [f for f in found if f.level == "error"]
    if errors:
        raise UsageError("; ".join(f.message for f in errors) + " (see `mlxbuild doctor`)")
    if not getattr(check, "_warned", False):
        check._warned = True
        for f in found:
            if f.level == "warning":
                print(f.line(), file=stream or sys.stderr)


# -- the lock


_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)\s*(?:;\s*([^#]+))?")


def read_lock(path: Path) -> dict[str, str]:
    """``{canonical name: version}`` of a pip-compile lock, for this platform (lines whose
    environment marker does not hold here are left out)."""
    pins = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", "-")):
            continue
        m = _PIN.match(line)
        if not m:
            raise UsageError(f"{path}:{number}: not a pinned requirement: {line}")
        name, version, marker = m.groups()
        if marker and not Requirement(f"{name}=={version}; {marker}").marker.evaluate():
            continue
        pins[canonicalize_name(name)] = version
    return pins


def lock_drift(path: Path) -> list[str]:
    """One line per locked package whose installed version differs (or is missing)."""
    problems = []
    for name, version in sorted(read_lock(path).items()):
        have = installed_version(name)
        if have is None:
            problems.append(f"{name}: locked {version}, not installed")
        elif _parse(have) != _parse(version):
            problems.append(f"{name}: locked {version}, installed {have}")
    return problems


def main(as_json: bool = False, lock: str | None = None) -> int:
    """`mlxbuild doctor`: 0 when nothing is refused (warnings allowed), 2 otherwise."""
    import json

    found = findings()
    drift = []
    if lock:
        try:
            drift = lock_drift(Path(lock))
        except (OSError, UsageError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    code = 2 if drift or any(f.level == "error" for f in found) else 0
    if as_json:
        print(json.dumps({
            "ok": code == 0,
            "python": sys.version.split()[0],
            "packages": [{"package": f.package, "installed": f.installed, "tested": list(f.tested),
                          "status": f.level, "message": f.message} for f in found],
            "lock": lock, "lock_drift": drift,
        }, indent=1))
        return code
    print(f"python {sys.version.split()[0]}")
    for f in found:
        print(f.line(), file=sys.stderr if f.level == "error" else sys.stdout)
    for line in drift:
        print(f"error: {line} ({lock})", file=sys.stderr)
    if lock and not drift:
        print(f"ok: every package matches {lock}")
    return code
