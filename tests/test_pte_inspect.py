"""inspect_pte(): facts read back from tiny portable / XNNPACK / MLX programs."""

from __future__ import annotations

import json

import pytest
import torch

from mlxbuild.pte_inspect import PTEInspectError, delegated_backends, inspect_pte, non_delegated_ops

CONSTANT_METHODS = {"get_max_seq_len": 128, "get_eos_ids": [1, 2], "use_kv_cache": True, "name": "tiny"}


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(8, 16)
        self.l2 = torch.nn.Linear(16, 4)
        self.register_buffer("scale", torch.full((4,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x))) * self.scale


def _export():
    torch.manual_seed(0)
    return torch.export.export(Tiny().eval(), (torch.randn(2, 8),))


def _write(prog, path):
    path.write_bytes(prog.buffer)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    d = tmp_path_factory.mktemp("pte")
    portable = to_edge_transform_and_lower(_export(), constant_methods=CONSTANT_METHODS).to_executorch()
    xnn = to_edge_transform_and_lower(
        _export(), partitioner=[XnnpackPartitioner()], constant_methods=CONSTANT_METHODS
    ).to_executorch()
    return {"portable": _write(portable, d / "portable.pte"), "xnnpack": _write(xnn, d / "xnnpack.pte")}


def _check_common(info, path):
    json.dumps(info)  # JSON-serializable
    assert info["file_size"] == path.stat().st_size
    assert info["file_identifier"].startswith("ET")
    assert set(info["methods"]) == {"forward"}
    fwd = info["methods"]["forward"]
    assert fwd["num_inputs"] == 1 and fwd["num_outputs"] == 1
    assert fwd["inputs"][0] == {
        "kind": "Tensor",
        "dtype": "float32",
        "sizes": [2, 8],
        "dim_order": [0, 1],
        "shape_dynamism": "STATIC",
    }
    assert fwd["outputs"][0]["dtype"] == "float32" and fwd["outputs"][0]["sizes"] == [2, 4]
    assert info["constant_methods"] == CONSTANT_METHODS
    assert info["segments"]["count"] >= 1
    assert info["segments"]["total_bytes"] == sum(info["segments"]["sizes"]) > 0
    assert info["segments"]["total_bytes"] <= info["file_size"] - info["program_size"]
    return fwd


def test_portable(built):
    info = inspect_pte(built["portable"])
    fwd = _check_common(info, built["portable"])
    assert delegated_backends(info) == set()
    ops = non_delegated_ops(info, "forward")
    assert ops == fwd["operators"]
    assert "aten::addmm.out" in ops or "aten::linear.out" in ops
    assert "aten::relu.out" in ops and "aten::mul.out" in ops
    assert all("::" in op and "." in op for op in ops)
    assert fwd["delegates"] == []
    assert fwd["instructions"]["KernelCall"] >= len(ops)
    assert fwd["instructions"]["DelegateCall"] == 0
    # weights + buffer live in the constant segment: 8*16 + 16 + 16*4 + 4 + 4 floats
    cs = info["constant_segment"]
    assert cs["num_tensors"] == 5 and cs["bytes"] >= (128 + 16 + 64 + 4 + 4) * 4
    assert info["named_data"] is None


def test_xnnpack(built):
    info = inspect_pte(built["xnnpack"])
    fwd = _check_common(info, built["xnnpack"])
    assert delegated_backends(info) == {"XnnpackBackend"}
    (d,) = fwd["delegates"]
    assert d["backend_id"] == "XnnpackBackend" and d["calls"] == 1
    assert d["location"] in ("inline", "segment") and d["payload_bytes"] > 0
    if d["location"] == "segment":
        assert d["payload_bytes"] == info["segments"]["sizes"][d["index"]]
    assert fwd["instructions"]["DelegateCall"] == 1
    assert non_delegated_ops(info) == []
    # XNNPACK stores its weights as named data
    assert info["named_data"]["count"] >= 4 and info["named_data"]["bytes"] >= (128 + 16 + 64 + 4) * 4
    with pytest.raises(KeyError):
        non_delegated_ops(info, "nope")


def test_mlx(tmp_path):
    from backends.mlx_schema import ensure_mlx_schema

    ensure_mlx_schema()
    from executorch.backends.mlx import MLXPartitioner
    from executorch.backends.mlx.passes import get_default_passes
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    prog = to_edge_transform_and_lower(
        _export(),
        transform_passes=get_default_passes(),
        partitioner=[MLXPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True),
        constant_methods=CONSTANT_METHODS,
    ).to_executorch()
    path = _write(prog, tmp_path / "mlx.pte")
    info = inspect_pte(path)
    fwd = _check_common(info, path)
    assert delegated_backends(info) == {"MLXBackend"}
    (d,) = fwd["delegates"]
    assert d["payload_bytes"] > 0 and d["calls"] == 1
    # Linear/ReLU/mul are all MLX-supported: nothing runs outside the delegate.
    assert non_delegated_ops(info) == []
    assert fwd["instructions"] == {
        "KernelCall": 0,
        "DelegateCall": 1,
        "other": 0,
        "total": 1,
        "by_kind": {"DelegateCall": 1},
    }
    # MLX keeps weights in named data
    assert info["named_data"]["count"] >= 5
    assert any(k.endswith("l1.weight") for k in info["named_data"]["keys"])


def test_single_element_list_stays_a_list(tmp_path):
    from executorch.exir import to_edge_transform_and_lower

    prog = to_edge_transform_and_lower(
        _export(), constant_methods={"get_eos_ids": [7], "get_bos_id": 7, "get_temp": 0.25}
    ).to_executorch()
    info = inspect_pte(_write(prog, tmp_path / "p.pte"))
    assert info["constant_methods"] == {"get_eos_ids": [7], "get_bos_id": 7, "get_temp": 0.25}


def test_not_a_pte(tmp_path):
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"\x00" * 200)
    with pytest.raises(PTEInspectError):
        inspect_pte(bad)


# --------------------------------------------------------------------------- report() / render(): `mlxbuild inspect`


def test_report_xnnpack_nodes_from_the_payload(built):
    from mlxbuild.pte_inspect import render, report

    info = report(built["xnnpack"])
    (d,) = info["methods"]["forward"]["delegates"]
    # Both linears run as XNNPACK fully-connected nodes (the ReLU folds into the first one's clamp).
    assert d["nodes"].get("FullyConnected") == 2, d["nodes"]
    assert info["methods"]["forward"]["lowered_ops"] is None
    assert info["record"] is None and info["record_matches"] is None
    text = render(info)
    assert "  delegate 0: XnnpackBackend, payload" in text
    assert f"    nodes ({sum(d['nodes'].values())}): FullyConnected ×2" in text
    assert "  portable kernels (0): none" in text
    assert "record: none beside this file" in text
    assert '  get_eos_ids = [1, 2]' in text and '  name = "tiny"' in text


def test_report_reads_the_record_beside_the_file(built, tmp_path):
    import hashlib
    import shutil

    from mlxbuild.pte_inspect import render, report

    pte = tmp_path / "model.pte"
    shutil.copyfile(built["portable"], pte)
    sha = hashlib.sha256(pte.read_bytes()).hexdigest()
    record = {"name": "tiny", "version": "1.0.0", "target": "cpu", "backend": "portable", "scheme": "none",
              "dtype": "fp32", "sha256": sha, "verification": {"passed": True, "max_abs_error": 1e-7,
                                                              "max_rel_error": 2e-8}}
    pte.with_suffix(".json").write_text(json.dumps(record))
    info = report(pte)
    assert info["record"] == record and info["record_matches"] is True
    assert info["methods"]["forward"]["delegates"] == []
    text = render(info)
    assert ("record: " + str(pte.with_suffix(".json")) + ": tiny 1.0.0 target cpu, portable none fp32; sha256 "
            "matches this file; verification passed (max abs error 1e-07, relative 2e-08)") in text
    assert "  input 0: float32[2, 8]" in text and "  output 0: float32[2, 4]" in text
    ops = info["methods"]["forward"]["operators"]
    assert f"  portable kernels ({len(ops)}): {', '.join(ops)}" in text
