"""Make ExecuTorch's MLX partitioner importable on a plain wheel install.

The executorch wheel ships ``executorch/backends/mlx/serialization/`` with
``schema.fbs`` and the code generator ``generate.py`` but without the modules that
generator produces (``mlx_graph_schema.py``, ``_generated_serializers.py``, the
``_generated/`` FlatBuffer package, ``../_generated_inspector.py``).  The package's
``__init__`` raises ImportError when they are missing, so
``from executorch.backends.mlx import MLXPartitioner`` fails.

``ensure_mlx_schema()`` generates those modules once per (executorch version,
schema) into a per-user cache -- never into site-packages, which may be read-only --
and installs an import hook so ``executorch.backends.mlx.serialization`` (and
``executorch.backends.mlx._generated_inspector``) resolve to the generated copy.
It must run before anything imports ``executorch.backends.mlx``.
"""

from __future__ import annotations

import compileall
import hashlib
import importlib.abc
import importlib.metadata
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from mlx_runtime.generated import (GeneratedFilesError, executorch_version as _executorch_version,
                                   find_flatc as _find_flatc, install_entry, schema_cache_root,
                                   shipped_mlx_dir as _shipped_mlx_dir)

__all__ = ["ensure_mlx_schema", "schema_cache_root", "MLXSchemaError"]

SERIALIZATION_PKG = "executorch.backends.mlx.serialization"
INSPECTOR_MOD = "executorch.backends.mlx._generated_inspector"

# Files generate.py writes next to itself; their presence means "generated".
_GENERATED_FILES = ("mlx_graph_schema.py", "_generated_serializers.py", "_generated/__init__.py")
# Written last into a finished cache entry; an entry without it is never used.
_MARKER = "mlxbuild-complete.json"
# Bump when the cache layout or generation recipe changes.
_LAYOUT_VERSION = 1

_lock = threading.Lock()
_resolved: Path | None = None
_via_finder = False


class MLXSchemaError(GeneratedFilesError):
    """The MLX serialization modules could not be generated."""


def _has_generated(ser_dir: Path) -> bool:
    return all((ser_dir / f).is_file() for f in _GENERATED_FILES)


def _cache_key(shipped_ser: Path) -> str:
    digest = hashlib.sha256((shipped_ser / "schema.fbs").read_bytes()).hexdigest()[:16]
    version = "".join(c if c.isalnum() or c in ".+-_" else "_" for c in _executorch_version())
    return f"{version}-{digest}-v{_LAYOUT_VERSION}"


# Stand-ins for the C++ loader templates generate.py fills in.  The wheel does not
# ship them, and the C++ output (runtime/MLXLoader.{h,cpp}) is not needed to export.
_STUB_TEMPLATE = "// mlxbuild: C++ loader templates are not shipped in the executorch wheel; stub.\n"


def _generate_into(shipped_ser: Path, dest: Path) -> None:
    """Populate ``dest/mlx/serialization`` (and ``dest/mlx/runtime``, ``dest/mlx/_generated_inspector.py``)."""
    ser = dest / "mlx" / "serialization"
    ser.mkdir(parents=True)
    for src in shipped_ser.iterdir():
        if src.is_file() and src.name not in _GENERATED_FILES and src.suffix in (".py", ".fbs", ".tmpl"):
            shutil.copy2(src, ser / src.name)
            (ser / src.name).chmod(0o644)
    for tmpl in ("MLXLoader.h.tmpl", "MLXLoader.cpp.tmpl"):
        if not (ser / tmpl).exists():
            (ser / tmpl).write_text(_STUB_TEMPLATE)

    flatc = _find_flatc()
    if os.path.isabs(flatc) and not os.access(flatc, os.X_OK):
        # A wheel unpacked without the exec bit; don't chmod site-packages, use a copy.
        local = dest / "flatc"
        shutil.copy2(flatc, local)
        local.chmod(local.stat().st_mode | stat.S_IXUSR)
        flatc = str(local)

    proc = subprocess.run(
        [sys.executable, str(ser / "generate.py"), "--flatc", flatc],
        cwd=ser,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    if proc.returncode != 0 or not _has_generated(ser):
        raise MLXSchemaError(
            f"MLX schema generation failed (rc={proc.returncode}) in {ser}:\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    # Sanity check: generate.py prints "flatc not found" but carries on without bindings.
    if not any((ser / "_generated" / "mlx_delegate").glob("*.py")):
        raise MLXSchemaError(f"flatc produced no Python bindings in {ser}/_generated:\n{proc.stdout[-4000:]}")
    compileall.compile_dir(str(dest / "mlx"), quiet=2, workers=1)
    dest.chmod(0o755)  # mkdtemp made it 0700
    (dest / _MARKER).write_text(
        json.dumps(
            {
                "executorch_version": _executorch_version(),
                "schema_sha256": hashlib.sha256((ser / "schema.fbs").read_bytes()).hexdigest(),
                "source": str(shipped_ser),
                "flatc": flatc,
                "layout_version": _LAYOUT_VERSION,
            },
            indent=1,
        )
    )


def _materialize(shipped_ser: Path) -> Path:
    """A complete cache entry of generated modules for ``shipped_ser``."""
    target = schema_cache_root() / _cache_key(shipped_ser)
    return install_entry(target, _MARKER, lambda tmp: _generate_into(shipped_ser, tmp))


class _MLXSchemaFinder(importlib.abc.MetaPathFinder):
    """Resolves the MLX serialization package (and inspector tables) to a generated copy."""

    mlxbuild_marker = "mlx_schema_finder"

    def __init__(self, mlx_dir: Path) -> None:
        self.mlx_dir = mlx_dir

    def find_spec(self, fullname, path=None, target=None):
        if fullname == SERIALIZATION_PKG:
            ser = self.mlx_dir / "serialization"
            return importlib.util.spec_from_file_location(
                fullname, ser / "__init__.py", submodule_search_locations=[str(ser)]
            )
        if fullname == INSPECTOR_MOD:
            f = self.mlx_dir / "_generated_inspector.py"
            if f.is_file():
                return importlib.util.spec_from_file_location(fullname, f)
        return None


def _install_finder(mlx_dir: Path) -> None:
    sys.meta_path[:] = [
        f for f in sys.meta_path if getattr(f, "mlxbuild_marker", None) != _MLXSchemaFinder.mlxbuild_marker
    ]
    sys.meta_path.insert(0, _MLXSchemaFinder(mlx_dir))


def ensure_mlx_schema() -> Path:
    """Make ``executorch.backends.mlx`` importable; return the serialization package dir in use.

    - If the installed package already has its generated modules (source build), or
      ``executorch.backends.mlx.serialization`` is already imported, nothing is done.
    - Otherwise the modules are generated under ``schema_cache_root()/<key>/mlx/``
      (key = executorch version + sha256 of schema.fbs) and an import hook is
      installed so ``executorch.backends.mlx.serialization`` loads from there.

    Must be called before the first ``import executorch.backends.mlx``. Idempotent;
    after the first call in a process it only checks a module-level cache.
    """
    global _resolved, _via_finder
    with _lock:
        mod = sys.modules.get(SERIALIZATION_PKG)
        if mod is not None and getattr(mod, "__path__", None):
            return Path(list(mod.__path__)[0])
        if _resolved is not None and (
            not _via_finder
            or any(
                getattr(f, "mlxbuild_marker", None) == _MLXSchemaFinder.mlxbuild_marker
                and f.mlx_dir / "serialization" == _resolved
                for f in sys.meta_path
            )
        ):
            return _resolved

        shipped_ser = _shipped_mlx_dir() / "serialization"
        if _has_generated(shipped_ser):
            _resolved, _via_finder = shipped_ser, False
            return _resolved
        if not (shipped_ser / "schema.fbs").is_file() or not (shipped_ser / "generate.py").is_file():
            raise MLXSchemaError(f"{shipped_ser} has neither generated modules nor schema.fbs + generate.py")

        entry = _materialize(shipped_ser)
        mlx_dir = entry / "mlx"
        _install_finder(mlx_dir)
        _resolved, _via_finder = mlx_dir / "serialization", True
        return _resolved


if __name__ == "__main__":  # pragma: no cover - manual use: python -m backends.mlx_schema
    print(ensure_mlx_schema())
