"""The CUDA target. Lowering and running need a CUDA GPU: those cases run on such a host
(benchmarks/cuda_on_device.sh runs this file there) and are skipped here with the reason.
What a CPU host can check runs everywhere: the runtime's reading of ExecuTorch's CUDA
delegate payload, its refusals, and the backend's compile specs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from backends import cuda_runtime

REPO = Path(__file__).resolve().parent.parent
CUDA_HOST = bool(torch.version.cuda) and torch.cuda.is_available() and bool(importlib.util.find_spec("triton"))
needs_gpu = pytest.mark.skipif(not CUDA_HOST, reason="needs a CUDA GPU, a CUDA torch and triton "
                                                     "(run benchmarks/cuda_on_device.sh on such a host)")


def test_payload_round_trips_executorchs_own_encoding():
    from executorch.backends.cuda.cuda_weight_collector import CudaWeightEntry, encode_cuda_weight_metadata

    entries = [CudaWeightEntry("model.embed_tokens.weight", "cuda_fqn_weight:cuda:model.embed_tokens.weight",
                               65536, 15, 1, 0, (512, 64), (64, 1)),
               CudaWeightEntry("key_cache_0", "cuda_fqn_weight:cuda:key_cache_0", 8192, 15, 1, 16,
                               (1, 2, 128, 16), (4096, 2048, 16, 1))]
    key, parsed = cuda_runtime.parse_payload(encode_cuda_weight_metadata("abc_so_blob", entries))
    assert key == "abc_so_blob"
    assert [(e["fqn"], e["storage_key"], e["nbytes"], e["dtype"], e["device"], e["offset"],
             tuple(e["sizes"]), tuple(e["strides"])) for e in parsed] == [
        (x.fqn, x.storage_key, x.storage_nbytes, x.dtype, x.device_type, x.storage_offset, x.sizes, x.strides)
        for x in entries]
    with pytest.raises(cuda_runtime.CudaRuntimeError, match="not a CUDA weight-metadata payload"):
        cuda_runtime.parse_payload(b"abc_so_blob\nabc_weights_blob")


def test_call_spec_leaves_count_the_tensor_inputs():
    # AOTInductor's input spec of a forward(input_ids, cache_position), as seen on an H100.
    leaf = {"type": None, "context": None, "children_spec": []}
    spec = [1, {"type": "builtins.tuple", "context": "null", "children_spec": [
        {"type": "builtins.tuple", "context": "null", "children_spec": [leaf, leaf]},
        {"type": "builtins.dict", "context": "[]", "children_spec": []}]}]
    assert cuda_runtime._leaves(json.dumps(spec)) == 2


def test_a_method_with_other_kernels_is_refused_by_name():
    plan = SimpleNamespace(name="forward", operators=[SimpleNamespace(name="et_copy::_h2d_copy"),
                                                      SimpleNamespace(name="aten::add")], delegates=[])
    with pytest.raises(cuda_runtime.CudaRuntimeError, match="forward: runs aten::add outside the CUDA delegate"):
        cuda_runtime._Method(plan, [], {}, "cuda:0", Path("."))


@pytest.mark.skipif(CUDA_HOST, reason="this host runs CUDA programs")
def test_no_gpu_is_one_line():
    assert cuda_runtime.unavailable()
    with pytest.raises(cuda_runtime.CudaRuntimeError, match="^cannot run CUDA programs here: ") as e:
        cuda_runtime.load(REPO / "no-such.pte")
    assert "\n" not in str(e.value)


def test_compile_specs_follow_the_programs_dtype():
    """ExecuTorch's Triton SDPA takes bf16 only: on for bf16 programs, off otherwise (the
    fp32 lowering failed inside it on an H100); autotuning on, so matmuls become Triton
    kernels instead of cuBLAS fallbacks ExecuTorch's CUDA runtime lacks."""
    pytest.importorskip("executorch.backends.cuda.cuda_backend")
    from backends import cuda

    class Linear(torch.nn.Module):
        def __init__(self, dtype):
            super().__init__()
            self.l = torch.nn.Linear(4, 4).to(dtype)

        def forward(self, x):
            return self.l(x)

    def specs(dtype, **options):
        program = torch.export.export(Linear(dtype), (torch.zeros(1, 4, dtype=dtype),))
        [partitioner] = cuda.partitioners(options, {"forward": program})["forward"]
        return {s.key: s.value for s in partitioner.delegation_spec.compile_specs}

    bf16, fp32 = specs(torch.bfloat16), specs(torch.float32)
    assert bf16["triton_kernel_mode"] == b"ON" and fp32["triton_kernel_mode"] == b"OFF"
    assert bf16["max_autotune"] == fp32["max_autotune"] == b"ON"
    assert specs(torch.float32, triton_kernels=True)["triton_kernel_mode"] == b"ON"
    assert specs(torch.bfloat16, max_autotune=False)["max_autotune"] == b"OFF"


@pytest.fixture(scope="module")
def gpu_built(tmp_path_factory, subprocess_env):
    root = tmp_path_factory.mktemp("cuda")
    env = subprocess_env(MLXBUILD_CACHE=root / "cache", MLXBUILD_ARTIFACTS=root / "artifacts")
    p = subprocess.run([sys.executable, "-m", "mlxbuild.cli", "build",
                        *(str(REPO / "benchmarks" / "cuda" / m) for m in ("qwen3-tiny-cuda.yaml", "qwen3-tiny-cuda-fp32.yaml"))],
                       cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return root / "artifacts"


@needs_gpu
@pytest.mark.parametrize("target,bound", [("cuda-bf16", 0.04), ("cuda-int4", 0.04), ("cuda-fp32", 1e-4)])
def test_cuda_artifact_is_lowered_and_run_on_the_gpu(gpu_built, target, bound):
    [record] = gpu_built.rglob(f"*-{target}.json")
    rec = json.loads(record.read_text())
    v = rec["verification"]
    assert v["passed"] and v["executed"] and "AOTI runner" in v["runtime"], v
    assert v["positions"] == 12 and v["max_rel_error"] <= bound and v["top1_agreement"] == 1.0, v
    # The weights travel in the .ptd ExecuTorch's CUDA runtime loads beside the program.
    assert any(n.endswith("aoti_cuda_blob.ptd") for n in rec["files"]), rec["files"]
    program = cuda_runtime.load(record.with_suffix(".pte"))
    first = program.run("forward", [torch.tensor([[1, 5, 7]]), torch.arange(3)])[0]
    program.reset()
    again = program.run("forward", [torch.tensor([[1, 5, 7]]), torch.arange(3)])[0]
    assert torch.equal(first, again)  # reset gives the shipped (empty) KV cache back


@needs_gpu
def test_cuda_int4_ships_packed_linears(gpu_built):
    """cuda_int4 linears ship as torchao's packed int4 layout and the record names it per
    layer. (Not smaller at these shapes: the tinygemm layout pads each linear's input
    dimension to a multiple of 1024, so the hidden-64 model's int4 .ptd is larger than its
    bf16 one; at K >= 1024 it is 0.31x: benchmarks/results/cuda-2026-12-05-int4/packing.txt)"""
    int4 = json.loads(next(gpu_built.rglob("*-cuda-int4.json")).read_text())
    assert any(n.endswith("aoti_cuda_blob.ptd") for n in int4["files"]), int4["files"]
    assert int4["layer_quantization"]["summary"]["counts"].get("cuda_int4", 0) >= 14, int4["layer_quantization"]["summary"]
