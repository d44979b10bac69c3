"""ensure_mlx_schema(): MLX partitioner importable from a wheel install, site-packages untouched."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shipped_mlx_dir() -> Path:
    spec = importlib.util.find_spec("executorch.backends.mlx")
    assert spec is not None and spec.submodule_search_locations
    return Path(list(spec.submodule_search_locations)[0])


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns if p.is_file() else 0)
    return out


def _run(code: str, cache: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "MLXBUILD_HOME": str(cache),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        # Keep the interpreter itself from refreshing .pyc files in site-packages:
        # the check below is about what ensure_mlx_schema writes.
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen, timeout: float = 120) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed:\n{out}\n{err[-6000:]}"
    return json.loads(out.strip().splitlines()[-1])


SHIPPED_HAS_GENERATED = (_shipped_mlx_dir() / "serialization" / "mlx_graph_schema.py").is_file()


def test_partitioner_importable_fresh_interpreter_without_writing_site_packages(tmp_path):
    shipped = _shipped_mlx_dir()
    before = _snapshot(shipped)
    proc = _run(
        """
        import json, sys, time
        assert "executorch.backends.mlx" not in sys.modules
        from backends.mlx_schema import ensure_mlx_schema
        p = ensure_mlx_schema()
        t = time.perf_counter(); p2 = ensure_mlx_schema(); again = time.perf_counter() - t
        from executorch.backends.mlx import MLXPartitioner
        import executorch.backends.mlx.serialization as ser
        from executorch.backends.mlx.serialization import mlx_graph_schema, _generated_serializers
        from executorch.backends.mlx.serialization._generated import MLXGraph
        from executorch.backends.mlx._generated_inspector import OP_NODE_FIELDS
        print(json.dumps({
            "path": str(p), "same": p == p2, "again_s": again,
            "ser_file": ser.__file__, "schema_file": mlx_graph_schema.__file__,
            "partitioner": MLXPartitioner.__name__, "n_op_fields": len(OP_NODE_FIELDS),
        }))
        """,
        tmp_path / "home",
    )
    res = _result(proc)
    assert res["partitioner"] == "MLXPartitioner"
    assert res["same"] and res["again_s"] < 0.01
    assert res["n_op_fields"] > 0
    assert _snapshot(shipped) == before, "ensure_mlx_schema wrote into site-packages"

    if SHIPPED_HAS_GENERATED:  # source build: used in place
        assert Path(res["ser_file"]).parent == shipped / "serialization"
        return
    cache = tmp_path / "home" / "mlx-schema"
    entries = [e for e in cache.iterdir()]
    assert len(entries) == 1, entries  # no leftover temp dirs
    entry = entries[0]
    assert (entry / "mlxbuild-complete.json").is_file()
    meta = json.loads((entry / "mlxbuild-complete.json").read_text())
    assert entry.name.startswith(meta["executorch_version"].replace("/", "_"))
    assert meta["schema_sha256"][:16] in entry.name
    assert Path(res["path"]) == entry / "mlx" / "serialization"
    assert Path(res["ser_file"]) == entry / "mlx" / "serialization" / "__init__.py"
    assert Path(res["schema_file"]).parent == entry / "mlx" / "serialization"
    # generate.py's files "next to" the package land inside the cache entry too
    assert (entry / "mlx" / "_generated_inspector.py").is_file()
    assert (entry / "mlx" / "runtime").is_dir()


@pytest.mark.skipif(SHIPPED_HAS_GENERATED, reason="source build: nothing is generated")
def test_concurrent_processes_share_one_cache_entry(tmp_path):
    code = """
        import json
        from backends.mlx_schema import ensure_mlx_schema
        p = ensure_mlx_schema()
        from executorch.backends.mlx.serialization import mlx_graph_schema
        print(json.dumps({"path": str(p), "schema_file": mlx_graph_schema.__file__}))
        """
    home = tmp_path / "home"
    procs = [_run(code, home) for _ in range(3)]
    results = [_result(p) for p in procs]
    assert len({r["path"] for r in results}) == 1
    cache = home / "mlx-schema"
    names = sorted(e.name for e in cache.iterdir())
    assert len(names) == 1 and not names[0].startswith("."), names
    marker = cache / names[0] / "mlxbuild-complete.json"
    mtime = marker.stat().st_mtime_ns

    # A later process reuses the entry instead of regenerating it.
    _result(_run(code, home))
    assert marker.stat().st_mtime_ns == mtime
    assert sorted(e.name for e in cache.iterdir()) == names
