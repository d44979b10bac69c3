"""Where the build keeps its cache and writes artifacts (relative to the working directory),
and which shared remote cache it uses."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Roots:
    cache: Path
    artifacts: Path

    @property
    def doit_db(self) -> Path:
        return self.cache / "doit-db.json"

    @property
    def hash_state(self) -> Path:
        return self.cache / "file-hashes.json"


def roots() -> Roots:
    return Roots(cache=Path(os.environ.get("MLXBUILD_CACHE", ".mlxbuild")).absolute(),
                 artifacts=Path(os.environ.get("MLXBUILD_ARTIFACTS", "artifacts")).absolute())


# --------------------------------------------------------------------------- remote cache

REMOTE_ENV = "MLXBUILD_REMOTE_CACHE"
_OFF = ("off", "none", "0", "false")


def remote_cache(manifests, cwd: Path | None = None) -> str | None:
    """The shared remote cache URL for a build of ``manifests``, or None.

    Most specific first: the ``MLXBUILD_REMOTE_CACHE`` environment variable (``off``
    turns the remote off whatever the files say), then the manifests'
    ``settings.remote_cache`` (all that set it must agree), then
    ``[tool.mlxbuild] remote_cache`` in ``pyproject.toml`` of the working directory.
    A malformed URL is an error naming where it came from.
    """
    from mlxbuild.errors import BuildError, ManifestError
    from mlxbuild.remote import parse_url

    env = os.environ.get(REMOTE_ENV)
    if env is not None and env.strip():
        if env.strip().lower() in _OFF:
            return None
        try:
            return str(parse_url(env.strip()))
        except ValueError as e:
            raise BuildError(f"{REMOTE_ENV}: {e}") from None

    named = {}
    for m in manifests:
        url = m.settings.remote_cache if getattr(m, "settings", None) else None
        if url:
            named.setdefault(str(parse_url(url)), str(m.source_file or "<manifest>"))
    if len(named) > 1:
        which = ", ".join(f"{f}: {u}" for u, f in named.items())
        raise BuildError(f"the manifests name different remote caches ({which}); "
                         f"set {REMOTE_ENV} to choose one")
    if named:
        return next(iter(named))

    pyproject = (cwd or Path.cwd()) / "pyproject.toml"
    value, line = _pyproject_setting(pyproject, "remote_cache")
    if value is None:
        return None
    where = (str(pyproject), line, 1, "tool.mlxbuild.remote_cache")
    if not isinstance(value, str):
        raise ManifestError(*where, f"expected an s3://bucket[/prefix] URL string, got {value!r}")
    try:
        return str(parse_url(value))
    except ValueError as e:
        raise ManifestError(*where, str(e)) from None


def _pyproject_setting(path: Path, name: str):
    """(value, line) of ``[tool.mlxbuild] name`` in a pyproject.toml; (None, 0) if unset."""
    import tomllib

    from mlxbuild.errors import ManifestError

    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None, 0
    try:
        value = tomllib.loads(text).get("tool", {}).get("mlxbuild", {}).get(name)
    except tomllib.TOMLDecodeError as e:
        # tomllib says "(at line L, column C)"; lift it into the usual file:line:col form.
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        line, col = (int(m.group(1)), int(m.group(2))) if m else (1, 1)
        raise ManifestError(str(path), line, col, None,
                            f"invalid TOML: {re.sub(r' [(]at line.*', '', str(e))}") from None
    if value is None:
        return None, 0
    # tomllib keeps no positions: the setting is the first line naming it after the table header.
    lines = text.splitlines()
    start = next((i for i, t in enumerate(lines) if re.match(r"\s*\[tool\.mlxbuild\]", t)), 0)
    line = next((i + 1 for i in range(start, len(lines))
                 if re.match(rf"\s*{name}\s*=", lines[i])), 1)
    return value, line
