"""Files generated once per ExecuTorch release and shared by every process: where they
live, the flatc that makes them, and the install step that makes a half-written entry
impossible to use. The MLX payload reader (``fb``) and the exporter's schema modules
(``backends.mlx_schema``) both generate from the schema that ships in the executorch
wheel, so they share this instead of each writing its own.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path


class GeneratedFilesError(RuntimeError):
    """Generated files (schema bindings) could not be made."""


def schema_cache_root() -> Path:
    """Directory holding generated schema copies: ``<base>/mlx-schema``.

    ``<base>`` is ``$MLXBUILD_HOME``, else ``$XDG_CACHE_HOME/mlxbuild``, else
    ``~/.cache/mlxbuild``.
    """
    home = os.environ.get("MLXBUILD_HOME")
    if home:
        base = Path(home)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "mlxbuild"
    return base.expanduser() / "mlx-schema"


def shipped_mlx_dir() -> Path:
    """Directory of the installed ``executorch.backends.mlx`` package (not imported)."""
    spec = importlib.util.find_spec("executorch.backends.mlx")
    if spec is None or not spec.submodule_search_locations:
        raise GeneratedFilesError("executorch.backends.mlx is not installed (executorch too old?)")
    return Path(list(spec.submodule_search_locations)[0])


def executorch_version() -> str:
    try:
        return importlib.metadata.version("executorch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def find_flatc() -> str:
    env = os.environ.get("FLATC_EXECUTABLE")
    if env:
        return env
    spec = importlib.util.find_spec("executorch.data.bin")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = Path(loc) / "flatc"
            if cand.is_file():
                return str(cand)
    which = shutil.which("flatc")
    if which:
        return which
    raise GeneratedFilesError("flatc not found (expected executorch/data/bin/flatc from the executorch wheel)")


def install_entry(target: Path, marker: str, build) -> Path:
    """Make ``target`` a complete generated entry, filled by ``build(dir)``.

    The entry is built in a private temp dir and renamed into place, so a concurrent
    process sees either nothing or a complete entry (one holding ``marker``); if
    another process wins the rename its entry is kept and ours discarded. An
    incomplete leftover (not made by this function) is moved aside first.
    """
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)
        for _attempt in range(3):
            try:
                os.rename(tmp, target)
                return target
            except OSError:
                if (target / marker).is_file():
                    return target
                if target.exists():
                    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
                    try:
                        os.rename(target, trash / "entry")
                    except OSError:
                        pass
                    shutil.rmtree(trash, ignore_errors=True)
        if (target / marker).is_file():
            return target
        raise GeneratedFilesError(f"could not install generated files at {target}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
