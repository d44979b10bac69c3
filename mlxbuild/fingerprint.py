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
    # The release number only: what our code decides is in each step's key, by the code it
    # runs (code_hash), so an upgrade that leaves a step's code alone leaves its key alone.
    from mlxbuild import __version__

    found["mlxbuild"] = __version__
    return found


# -- the code a step's bytes depend on --------------------------------------------------
#
# The rule (what `code_hash` hashes for a step): the source of
#
#   1. the step's stage module (``mlxbuild.stages.<kind>``),
#   2. what that stage combines, named by the plan from the step's declared inputs: the task
#      kind's family modules (``mlxbuild.families.modules_of(task)``: text_generation; or
#      speech_to_text with whisper and parakeet) for export, reference, lower and verify; the
#      export flavour (``backends.flavours.<flavour>``) for export and lower; the backend
#      module (``backends.<name>``) for lower and verify; the backend's runtime
#      (``mlx_runtime`` or ``backends.et_runtime``) and the structural check for verify,
#   3. and every module of ours those import, statically (function-level imports included:
#      they run too), closed transitively.
#
# The dispatch tables (``mlxbuild.families``, ``backends``, ``backends.flavours``) are hashed
# as text but their imports are not followed: what they dispatch to by name is exactly what
# (2) adds, and following them would put every family and backend into every key. A
# package's ``__init__`` is included only where it is imported by name (``from pkg import
# name`` of a submodule reads the submodule). The structure keeps these closures small:
# families import no backend and no stage, the backends and the runtime import nothing of
# mlxbuild, and nothing imports in a circle (tests/test_structure.py holds all three).
OUR_PACKAGES = ("mlxbuild", "backends", "mlx_runtime")
DISPATCH_TABLES = frozenset({"mlxbuild.families", "backends", "backends.flavours"})


@lru_cache(maxsize=None)
def _package_root(name: str) -> Path:
    # Found, not imported: hashing the runtime's source must not load the runtime.
    import importlib.util

    return Path(importlib.util.find_spec(name).origin).parent


def _module_file(dotted: str) -> Path | None:
    top, _, rest = dotted.partition(".")
    if top not in OUR_PACKAGES:
        return None
    base = _package_root(top).joinpath(*rest.split(".")) if rest else _package_root(top)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(file: Path) -> str:
    for top in OUR_PACKAGES:
        root = _package_root(top)
        if file == root / "__init__.py":
            return top
        if root in file.parents:
            parts = [top, *file.relative_to(root).with_suffix("").parts]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise ValueError(f"{file} is not in {OUR_PACKAGES}")


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


@lru_cache(maxsize=None)
def imports_of(file: Path) -> frozenset[Path]:
    """Our modules that `file` imports, statically (function-level imports included)."""
    import ast

    found = set()
    text = file.read_text()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found.update(f for f in (_module_file(a.name) for a in node.names) if f)
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(file, node.module, node.level)
            if not module:
                continue
            for alias in node.names:
                sub = _module_file(f"{module}.{alias.name}")
                target = sub or _module_file(module)  # a submodule, else a name of the package
                if target:
                    found.add(target)
    if file.name == "__init__.py" and "pkgutil" in text:
        found.update(file.parent.rglob("*.py"))  # a package that loads all its modules
    found.discard(file)
    return frozenset(found)


def closure(*roots: str) -> list[Path]:
    """The files of `roots` (dotted module names) and of everything of ours they import,
    dispatch tables as leaves (see the rule above)."""
    tables = {_module_file(t) for t in DISPATCH_TABLES}
    todo = [f for f in (_module_file(r) for r in roots) if f]
    seen: set[Path] = set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        if f not in tables:
            todo.extend(imports_of(f) - seen)
    return sorted(seen)


@lru_cache(maxsize=None)
def code_hash(*roots: str) -> str:
    """sha256 over the source of `closure(*roots)`: a step's key includes the code that
    decides its bytes and nothing else, so editing the verifier does not invalidate exports."""
    h = hashlib.sha256()
    for f in closure(*roots):
        h.update(module_name(f).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]
