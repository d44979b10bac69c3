"""The build manifest: YAML -> validated pydantic models.

Public API::

    load_manifest(path) -> Manifest          # raises ManifestError (one line, file:line:col)
    parse_manifest(text, file="<string>") -> Manifest
    json_schema() -> dict                    # the JSON schema committed in schema/

Every validation problem is reported as a single :class:`~mlxbuild.errors.ManifestError`
pointing at the offending YAML node. The parts: ``models`` (what a manifest may say),
``positions`` (YAML with node positions), ``errors`` (validation errors as located
lines). The schema command is ``mlxbuild schema``. Nothing here imports torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from mlxbuild.errors import ManifestError
from mlxbuild.manifest.errors import first_error
from mlxbuild.manifest.models import *  # noqa: F401,F403
from mlxbuild.manifest.models import schema_text  # noqa: F401
from mlxbuild.manifest.errors import _describe
from mlxbuild.manifest.models import Manifest, __all__ as _models_all
from mlxbuild.manifest.positions import compose

__all__ = [*_models_all, "load_manifest", "parse_manifest"]


def parse_manifest(text: str, file: str | os.PathLike = "<string>") -> Manifest:
    """Parse and validate manifest YAML ``text``; ``file`` is used in errors and to resolve paths."""
    fname = os.fspath(file)
    data, positions = compose(text, fname, Manifest.model_fields)
    if not isinstance(data, dict):
        line, col = positions.get((), (1, 1))
        raise ManifestError(
            fname, line, col, None,
            f"the top level must be a mapping with: {', '.join(Manifest.model_fields)}; "
            f"got {_describe(data)}",
        )
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as e:
        raise first_error(e, data, positions, fname) from None
    if fname != "<string>":
        manifest.manifest_path = fname
    manifest._positions = positions
    return manifest


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read, parse and validate the manifest at ``path``.

    Raises :class:`ManifestError` (one line: ``file:line:col: field: message``)
    for any problem, including an unreadable file.
    """
    fname = os.fspath(path)
    try:
        raw = Path(fname).read_bytes()
    except OSError as e:
        raise ManifestError(fname, 1, 1, None, f"cannot read manifest: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        before = raw[: e.start]
        line = before.count(b"\n") + 1
        col = e.start - (before.rfind(b"\n") + 1) + 1
        raise ManifestError(fname, line, col, None, "manifest is not valid UTF-8") from None
    return parse_manifest(text, fname)
