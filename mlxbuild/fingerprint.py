"""Content hashes for cache keys, computed without importing torch.

A no-op build hashes every input on each run, so file hashes are remembered by
(path, size, mtime_ns) in a small JSON state file, the way DVC does: a 1.2 GB
checkpoint is read once, not on every `doit build`.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from importlib import metadata
from pathlib import Path

TOOLS = ("torch", "executorch", "torchao", "transformers")
_CHUNK = 1 << 20


def stable_hash(*parts) -> str:
    """sha256 of JSON-encoded parts; key order never matters."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class FileHasher:
    """sha256 of files, remembered across runs by (size, mtime_ns)."""

    def __init__(self, state_file: Path | None):
        self.state_file = state_file
        self._known: dict[str, list] = {}
        self._dirty = False
        if state_file and state_file.exists():
            try:
                self._known = json.loads(state_file.read_text())
            except (OSError, ValueError):
                self._known = {}

    def hash(self, path: Path) -> str:
        real = str(Path(path).resolve())
        st = os.stat(real)
        stamp = [st.st_size, st.st_mtime_ns]
        known = self._known.get(real)
        if known and known[:2] == stamp:
            return known[2]
        digest = sha256_file(Path(real))
        self._known[real] = stamp + [digest]
        self._dirty = True
        return digest

    def save(self) -> None:
        if not (self._dirty and self.state_file):
            return
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self._known))
        os.replace(tmp, self.state_file)
        self._dirty = False


@lru_cache(maxsize=None)
def tool_versions() -> dict[str, str]:
    found = {}
    for name in TOOLS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "missing"
    found["mlxbuild"] = _own_version()
    return found


@lru_cache(maxsize=None)
def _own_version() -> str:
    # The release number alone would let a code change reuse stale exports during
    # development, so our own source files are part of the identity too.
    from mlxbuild import __version__

    h = hashlib.sha256()
    for package in ("mlxbuild", "delegate"):
        root = Path(__import__(package).__file__).parent
        for file in sorted(root.rglob("*.py")):
            h.update(file.relative_to(root).as_posix().encode())
            h.update(file.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"
