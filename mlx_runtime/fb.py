"""Python bindings for the MLX delegate payload, and the payload reader.

The payload schema is the installed ``executorch/backends/mlx/serialization/schema.fbs``.
Its Python bindings are generated once per schema with flatc's object API
(``flatc --python --gen-object-api``; flatc ships in the executorch wheel) into a
per-user cache, ``<mlxbuild cache>/mlx-runtime-fb/<executorch version>-<schema sha>/``,
the same root and the same atomic temp-dir-then-rename recipe as
``mlx_runtime.generated``. The generated modules import each other as
``mlx_delegate.*``; a meta-path finder maps exactly that package name to the cache
entry, so nothing is added to ``sys.path`` and executorch's own
``executorch.backends.mlx.serialization._generated`` package is left alone.

Payload layout (``mlx_graph_serialize.py``)::

    [4 bytes padding][b"MLX0"][u64 data_segment_offset][u64 data_segment_size]
    [flatbuffer MLXGraph][padding][data segment]
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.abc
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

__all__ = ["bindings", "read_payload", "node_type_names", "node_counts", "PayloadError", "HEADER_LENGTH", "MAGIC",
           "MAX_SUPPORTED_VERSION"]

HEADER_LENGTH = 24
MAGIC = b"MLX0"
# The newest MLX schema version this runtime understands (MLXBackend.cpp: kMaxSupportedVersion).
MAX_SUPPORTED_VERSION = 1
PACKAGE = "mlx_delegate"
_MARKER = "mlxbuild-complete.json"
_LAYOUT_VERSION = 1

_lock = threading.Lock()
_pkg: ModuleType | None = None


class PayloadError(ValueError):
    """The delegate payload is not a readable MLX program."""


def _schema_path() -> Path:
    from .generated import shipped_mlx_dir as _shipped_mlx_dir

    return _shipped_mlx_dir() / "serialization" / "schema.fbs"


def _cache_dir(schema: Path) -> Path:
    from .generated import executorch_version as _executorch_version, schema_cache_root

    digest = hashlib.sha256(schema.read_bytes()).hexdigest()[:16]
    version = "".join(c if c.isalnum() or c in ".+-_" else "_" for c in _executorch_version())
    return schema_cache_root().parent / "mlx-runtime-fb" / f"{version}-{digest}-v{_LAYOUT_VERSION}"


def _generate(schema: Path, target: Path) -> Path:
    from .generated import install_entry

    return install_entry(target, _MARKER, lambda out: _run_flatc(schema, out))


def _run_flatc(schema: Path, out: Path) -> None:
    from .generated import GeneratedFilesError as MLXSchemaError, find_flatc as _find_flatc

    flatc = _find_flatc()
    with tempfile.TemporaryDirectory() as scratch:
        if os.path.isabs(flatc) and not os.access(flatc, os.X_OK):
            # Some installs drop the executable bit of package data.
            local = Path(scratch) / "flatc"
            shutil.copy2(flatc, local)
            local.chmod(0o755)
            flatc = str(local)
        proc = subprocess.run([flatc, "--python", "--gen-object-api", "-o", str(out), str(schema)],
                              capture_output=True, text=True)
    if proc.returncode != 0 or not (out / PACKAGE / "MLXGraph.py").is_file():
        raise MLXSchemaError(f"flatc failed to generate MLX bindings (rc={proc.returncode}):\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    init = out / PACKAGE / "__init__.py"
    if not init.exists():
        init.write_text("")
    (out / _MARKER).write_text(json.dumps({"schema": str(schema), "flatc": flatc,
                                           "schema_sha256": hashlib.sha256(schema.read_bytes()).hexdigest()}))


class _Finder(importlib.abc.MetaPathFinder):
    """Resolves ``mlx_delegate`` (and its modules) to one generated bindings directory."""

    marker = "mlx_runtime_fb_finder"

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        if fullname == PACKAGE:
            d = self.root / PACKAGE
            return importlib.util.spec_from_file_location(fullname, d / "__init__.py",
                                                          submodule_search_locations=[str(d)])
        if fullname.startswith(PACKAGE + "."):
            f = self.root / PACKAGE / (fullname.split(".", 1)[1].replace(".", "/") + ".py")
            if f.is_file():
                return importlib.util.spec_from_file_location(fullname, f)
        return None


def bindings() -> ModuleType:
    """The generated ``mlx_delegate`` package (``MLXGraph``, ``OpNode``, ``AddNode``...)."""
    global _pkg
    with _lock:
        if _pkg is not None:
            return _pkg
        schema = _schema_path()
        root = _generate(schema, _cache_dir(schema))
        loaded = sys.modules.get(PACKAGE)
        if loaded is not None and Path(loaded.__file__).parent != root / PACKAGE:
            raise PayloadError(f"another {PACKAGE!r} package is already imported from {loaded.__file__}")
        if not any(getattr(f, "marker", None) == _Finder.marker for f in sys.meta_path):
            sys.meta_path.insert(0, _Finder(root))
        pkg = importlib.import_module(PACKAGE)
        for mod in ("MLXGraph", "OpNode", "SlotType"):
            setattr(pkg, mod, importlib.import_module(f"{PACKAGE}.{mod}"))
        _add_schema_names(pkg, schema)
        _pkg = pkg
        return pkg


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


def _add_schema_names(pkg: ModuleType, schema: Path) -> None:
    """Let object-API fields be read by their schema names as well.

    flatc's Python object API spells multi-word fields in lowerCamel
    (``groupSize``, ``isVid``); each ``<Table>T`` class gets a read/write property
    under the schema's snake_case name (``group_size``, ``is_vid``), so handlers can
    use either spelling.
    """
    text = re.sub(r"//[^\n]*", "", schema.read_text())
    for table, body in re.findall(r"\b(?:table|struct)\s+(\w+)\s*\{([^}]*)\}", text):
        try:
            cls = getattr(importlib.import_module(f"{PACKAGE}.{table}"), f"{table}T")
        except (ImportError, AttributeError):
            continue
        for field in re.findall(r"(\w+)\s*:", body):
            camel = _camel(field)
            if camel != field and not hasattr(cls, field):
                setattr(cls, field, property(lambda self, _c=camel: getattr(self, _c),
                                             lambda self, v, _c=camel: setattr(self, _c, v)))


_names: dict[int, str] | None = None


def node_type_names() -> dict[int, str]:
    """OpNode union tag -> node table name (``"AddNode"``...)."""
    global _names
    if _names is None:
        op = bindings().OpNode.OpNode
        _names = {v: k for k, v in vars(op).items() if not k.startswith("_") and isinstance(v, int)}
    return _names


def parse_header(data) -> tuple[int, int]:
    """(data_segment_offset, data_segment_size) from a payload header; checks the magic."""
    if len(data) < HEADER_LENGTH:
        raise PayloadError(f"MLX payload too short ({len(data)} bytes; the header alone is {HEADER_LENGTH})")
    magic = bytes(data[4:8])
    if magic != MAGIC:
        raise PayloadError(f"not an MLX delegate payload: magic {magic!r}, expected {MAGIC!r}")
    offset, size = struct.unpack_from("<QQ", data, 8)
    return offset, size


def read_payload(data) -> tuple[object, memoryview]:
    """Parse an MLX delegate payload: ``(MLXGraphT, data segment)``.

    Raises ``PayloadError`` for a bad magic, a truncated payload, an unreadable
    flatbuffer, or a schema version newer than ``MAX_SUPPORTED_VERSION``.
    """
    mv = memoryview(data).cast("B")
    offset, size = parse_header(mv)
    if offset < HEADER_LENGTH or offset + size > len(mv):
        raise PayloadError(f"MLX payload truncated or corrupt: data segment [{offset}, {offset + size}) "
                           f"outside the {len(mv)}-byte payload")
    fb = bytes(mv[HEADER_LENGTH:offset])
    pkg = bindings()
    try:
        graph = pkg.MLXGraph.MLXGraphT.InitFromPackedBuf(fb, 0)
    except Exception as e:  # noqa: BLE001 - flatbuffers raises assorted errors on garbage
        raise PayloadError(f"cannot parse the MLX graph flatbuffer: {type(e).__name__}: {e}") from e
    version = graph.version.decode() if isinstance(graph.version, bytes) else graph.version
    if version:
        try:
            v = int(version)
        except ValueError:
            raise PayloadError(f"invalid MLX schema version {version!r} (expected an integer)") from None
        if v > MAX_SUPPORTED_VERSION:
            raise PayloadError(f"this .pte needs MLX runtime schema version {v}, but this runtime supports "
                               f"up to version {MAX_SUPPORTED_VERSION}; upgrade mlxbuild/executorch")
    return graph, mv[offset:offset + size]


def node_counts(chains) -> dict[str, int]:
    """{node type: count} over a graph's instruction chains (``MLXGraph.instructionChains``)."""
    names = node_type_names()
    counts: dict[str, int] = {}
    for chain in chains or []:
        for ins in chain.instructions or []:
            name = names.get(int(ins.opType), str(ins.opType))
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))
