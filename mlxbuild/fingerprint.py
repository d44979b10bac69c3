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
    """sha256 of files, remembered across runs by (size, mtime_ns, inode): a file replaced
    by another of the same size and time is a new inode."""

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
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        known = self._known.get(real)
        if known and known[:3] == stamp:
            return known[3]
        digest = sha256_file(Path(real))
        self._known[real] = stamp + [digest]
        self._dirty = True
        return digest

    # Facts about content already established (a checkpoint found well-formed), by a key
    # that hashes that content: kept in the same state file.
    _NOTES = "notes"

    def noted(self, tag: str) -> bool:
        return tag in self._known.get(self._NOTES, [])

    def note(self, tag: str) -> None:
        if not self.noted(tag):
            self._known.setdefault(self._NOTES, []).append(tag)
            self._dirty = True

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


OUR_PACKAGES = ("mlxbuild", "delegate")


def _package_root(name: str) -> Path:
    return Path(__import__(name).__file__).parent


def _module_file(dotted: str) -> Path | None:
    top, _, rest = dotted.partition(".")
    if top not in OUR_PACKAGES:
        return None
    base = _package_root(top).joinpath(*rest.split(".")) if rest else _package_root(top)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _absolute(file: Path, module: str | None, level: int) -> str | None:
    """The dotted name a (possibly relative) `from X import` refers to."""
    if level == 0:
        return module
    for top in OUR_PACKAGES:
        root = _package_root(top)
        if root in file.parents:
            parts = [top, *file.parent.relative_to(root).parts]
            parts = parts[: len(parts) - (level - 1)]
            return ".".join(parts + ([module] if module else []))
    return None


def _imports(file: Path) -> set[Path]:
    """Our modules that `file` imports, statically (function-level imports included)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(file, node.module, node.level)
            names = [module] + [f"{module}.{a.name}" for a in node.names] if module else []
        for name in names:
            target = _module_file(name)
            if target:
                found.add(target)
    if file.name == "__init__.py" and "pkgutil" in file.read_text():
        found.update(file.parent.rglob("*.py"))  # a package that loads all its modules
    return found


@lru_cache(maxsize=None)
def code_hash(*roots: str) -> str:
    """sha256 over the source of `roots` (dotted module names) and everything of ours they
    import. A step's key includes the code that step runs and nothing else, so editing
    the verifier does not invalidate exports."""
    todo = [f for f in (_module_file(r) for r in roots) if f]
    seen: set[Path] = set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo.extend(_imports(f) - seen)
    h = hashlib.sha256()
    for f in sorted(seen):
        h.update(f.as_posix().split("/site-packages/")[-1].encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


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
