"""`mlxbuild inspect ART.pte [--json]` on real tiny artifacts (the release built once per
session by tests/test_release.py: mlx-4w and portable-fp32, each with its record)."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from test_release import NAME, released_once  # tests/ is on sys.path (pytest's rootdir-relative import)


@pytest.fixture(scope="module")
def released(tmp_path_factory, subprocess_env):
    return released_once(tmp_path_factory, subprocess_env)


def _inspect(capsys, *args) -> tuple[int, str, str]:
    from mlxbuild.cli import main

    rc = main(["inspect", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_inspect_mlx_text(released, capsys):
    import mlx_runtime

    pte = released.pte("mlx-4w")
    record = json.loads(pte.with_suffix(".json").read_text())
    rc, out, err = _inspect(capsys, pte)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"{pte}: {pte.stat().st_size} bytes, program ")
    assert "method forward:" in lines
    assert "  input 0: int64[1, 128] (dynamic_bound)" in lines
    assert "  input 1: int64[128] (dynamic_bound)" in lines
    assert "  output 0: float32[1, 128, 512] (dynamic_bound)" in lines
    assert re.search(r"^  delegate 0: MLXBackend, payload \d+ bytes \((segment|inline)\), 1 call\(s\)$", out, re.M), out

    # Node counts read from the payload agree with what the MLX runtime loads and runs.
    counts = mlx_runtime.load(pte).method("forward").delegates[0].node_counts()
    m = re.search(r"^    nodes \((\d+)\): (.+)$", out, re.M)
    assert m and int(m.group(1)) == sum(counts.values()), out
    shown = dict((name, int(n)) for name, n in re.findall(r"(\w+) ×(\d+)", m.group(2)))
    assert shown == counts
    assert "QuantizedMatmulNode" in counts  # 4-bit linears run as quantized matmuls
    # The aten ops the build lowered into the delegate, from the record beside the file.
    lowered = record["delegation"]["forward"]["delegated_ops"]
    assert re.search(rf"^  aten ops lowered into delegates \(record\): .*linear\.default ×{lowered['linear.default']}",
                     out, re.M), out
    # Only the cache-position write-back stays outside the delegate.
    assert "  portable kernels (1): aten::copy_" in lines, out
    for k, v in record["constant_methods"].items():
        assert f"  {k} = {json.dumps(v)}" in lines, k
    assert re.search(r"^segments: \d+, \d+ bytes: \d+(, \d+)*$", out, re.M), out
    assert re.search(rf"^record: .*{NAME}-mlx-4w\.json: {NAME} 0\.1\.0 target mlx-4w, mlx 4w fp32; sha256 matches "
                     r"this file; verification passed \(max abs error", out, re.M), out


def test_inspect_json(released, capsys):
    from mlxbuild.pte_inspect import inspect_pte

    for target in ("mlx-4w", "portable-fp32"):
        pte = released.pte(target)
        rc, out, err = _inspect(capsys, pte, "--json")
        assert rc == 0, err
        info = json.loads(out)
        plain = inspect_pte(pte)
        assert info["segments"] == plain["segments"]
        assert info["constant_methods"] == plain["constant_methods"]
        fwd, plain_fwd = info["methods"]["forward"], plain["methods"]["forward"]
        assert fwd["inputs"] == plain_fwd["inputs"] and fwd["operators"] == plain_fwd["operators"]
        record = json.loads(pte.with_suffix(".json").read_text())
        assert info["record"] == record and info["record_matches"] is True
        if target == "portable-fp32":
            assert fwd["delegates"] == [] and len(fwd["operators"]) > 5
            assert sorted(fwd["operators"]) == sorted(set(fwd["operators"]))
        else:
            (d,) = fwd["delegates"]
            assert d["backend_id"] == "MLXBackend" and sum(d["nodes"].values()) > 0
        assert fwd["lowered_ops"] == record["delegation"]["forward"]["delegated_ops"]


def test_inspect_portable_and_a_record_that_does_not_match(released, tmp_path, capsys):
    pte = tmp_path / "copy.pte"
    shutil.copyfile(released.pte("portable-fp32"), pte)
    rc, out, _ = _inspect(capsys, pte)
    assert rc == 0
    assert "record: none beside this file" in out
    assert re.search(r"^  portable kernels \((\d+)\): aten::", out, re.M), out
    assert "delegate 0" not in out

    shutil.copyfile(released.pte("mlx-4w").with_suffix(".json"), pte.with_suffix(".json"))
    rc, out, _ = _inspect(capsys, pte)
    assert rc == 0 and "sha256 DOES NOT match this file" in out, out


def test_inspect_bad_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"\0" * 100)
    rc, out, err = _inspect(capsys, bad)
    assert rc == 2 and out == ""
    assert re.fullmatch(rf"error: {re.escape(str(bad))}: not an ExecuTorch program .*\n", err), err
    rc, out, err = _inspect(capsys, tmp_path / "missing.pte")
    assert rc == 2 and out == "" and len(err.splitlines()) == 1 and "missing.pte" in err, err
