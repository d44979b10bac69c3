"""The MLX targets' TurboQuant KV cache (``options: {kv_cache: turboquant}``, the ``mlx-tq4``
flavour) and our runtime's computation of ExecuTorch's TurboQuant Metal kernels off
Apple GPUs (``mlx_runtime.kernels``).

- The kernels the runtime recognises are the installed ExecuTorch's, by name and source
  hash, and each computes what ExecuTorch's own eager op computes.
- A built TurboQuant artifact runs here: its logits equal ExecuTorch's TurboQuant cache
  run eagerly in torch (so the runtime computes the kernels' math, not just something
  close to the plain model), stay within the stated tolerance of the plain-cache
  artifact, and its cache takes about a third of the plain cache's bytes.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from buildlog import doit_command

KERNEL_MODULES = {"tq_norm": ("_TQ_NORM_SOURCE", "_TQ_NORM_HEADER"),
                  "tq4_compress": ("_TQ4_COMPRESS_SOURCE", None),
                  "tq_dequant": ("_TQ_DEQUANT_SOURCE", "_TQ_DEQUANT_HEADER")}


def _executorch_kernels() -> dict:
    import importlib

    from backends.mlx_schema import ensure_mlx_schema

    ensure_mlx_schema()
    found = {}
    for name, (source, header) in KERNEL_MODULES.items():
        module = importlib.import_module(f"executorch.backends.mlx.custom_kernel_ops.{name}")
        found[name] = (getattr(module, source), getattr(module, header) if header else "")
    return found


def test_the_runtime_knows_executorchs_own_kernels():
    from mlx_runtime import kernels

    for name, (source, header) in _executorch_kernels().items():
        assert kernels.known(name, source, header) is not None, name
        # one character off is another kernel: not run as this one
        assert kernels.known(name, source + " ", header) is None
        assert kernels.known(name + "x", source, header) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_each_kernel_computes_what_executorchs_op_does(dtype):
    import mlx.core as mx

    from mlx_runtime import kernels

    sources = _executorch_kernels()

    def mx_of(t: torch.Tensor):
        if t.dtype == torch.bfloat16:
            return mx.array(t.float().numpy()).astype(mx.bfloat16)
        return mx.array(t.numpy())

    def torch_of(a) -> torch.Tensor:
        if a.dtype == mx.bfloat16:
            return torch.from_numpy(np.array(a.astype(mx.float32))).to(torch.bfloat16)
        return torch.from_numpy(np.array(a))

    def compute(name, inputs, shape, out_dtype):
        fn = kernels.known(name, *sources[name])
        return torch_of(fn([mx_of(t) for t in inputs], {}, [list(shape)], [out_dtype])[0])

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 128, generator=g).to(dtype)
    mx_dtype = mx.bfloat16 if dtype == torch.bfloat16 else mx.float32
    want = torch.ops.mlx.tq_norm(x)
    torch.testing.assert_close(compute("tq_norm", [x], want.shape, mx_dtype), want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0)

    from backends.flavours.mlx_turboquant import import_turboquant

    import_turboquant()  # ExecuTorch's package around the codebook imports torchtune, which it lacks
    from executorch.extension.llm.modules.turboquant.codebook import solve_lloyd_max

    centroids, boundaries = solve_lloyd_max(128, 4)
    rotated = torch.randn(3, 5, 128, generator=g).to(dtype) / 128 ** 0.5
    want = torch.ops.mlx.tq4_compress(rotated, boundaries.to(dtype))
    assert torch.equal(compute("tq4_compress", [rotated, boundaries.to(dtype)], want.shape, mx.uint8), want)

    norms = torch.rand(3, 5, 1, generator=g).to(dtype) + 0.5
    want = torch.ops.mlx.tq_dequant(want, norms, centroids.to(dtype))
    got = compute("tq_dequant", [torch.ops.mlx.tq4_compress(rotated, boundaries.to(dtype)), norms, centroids.to(dtype)],
                  want.shape, mx_dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# --------------------------------------------------------------------------- built artifacts

MANIFEST = {
    "name": "qwen3-tq", "version": "0.1.0",
    "model": {"source": {"synthetic": {"architecture": "qwen3", "seed": 0, "config": {
        "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 1024,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}}},
        "dtype": "bf16", "task": "text-generation"},
    "export": {"max_context_length": 64},
    "targets": [{"name": "mlx-bf16", "backend": "mlx", "quantization": "none"},
                {"name": "mlx-bf16-tq4", "backend": "mlx", "quantization": "none",
                 "options": {"kv_cache": "turboquant"}}],
}


@pytest.fixture(scope="module")
def built(tmp_path_factory, subprocess_env):
    root = tmp_path_factory.mktemp("turboquant")
    (root / "tq.yaml").write_text(yaml.safe_dump(MANIFEST, sort_keys=False))
    p = subprocess.run(doit_command() + ["build", "tq.yaml"], cwd=root, capture_output=True, text=True,
                       timeout=900, env=subprocess_env(MLXBUILD_CACHE=root / "cache",
                                                       MLXBUILD_ARTIFACTS=root / "artifacts"))
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return root / "artifacts" / "qwen3-tq" / "0.1.0"


def _run(pte: Path, tokens: torch.Tensor, prefill: int) -> np.ndarray:
    import mlx_runtime

    from mlxbuild.families import text_generation

    return text_generation.run_pte(mlx_runtime.load(pte), tokens.numpy(), prefill)


def test_turboquant_artifact_is_verified_within_its_stated_tolerance(built):
    import json

    from mlxbuild.tolerance import TURBOQUANT_REL

    plain = json.loads((built / "qwen3-tq-mlx-bf16.json").read_text())["verification"]
    tq = json.loads((built / "qwen3-tq-mlx-bf16-tq4.json").read_text())["verification"]
    assert plain["passed"] and tq["passed"] and tq["executed"]
    assert tq["tolerance"]["max_rel_error"] == TURBOQUANT_REL > plain["tolerance"]["max_rel_error"]
    assert plain["max_rel_error"] < tq["max_rel_error"] <= TURBOQUANT_REL  # the cache's own error shows
    assert tq["top1_agreement_decisive"] == 1.0


def test_turboquant_artifact_against_the_plain_cache_artifact(built):
    """Both artifacts through our runtime over a prefill and decode steps: the TurboQuant one
    within the stated tolerance of the plain-cache one, and on the same token wherever the
    plain one's top two logits are further apart than that."""
    from mlxbuild.tolerance import TURBOQUANT_REL

    tokens = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(4))
    tq = _run(built / "qwen3-tq-mlx-bf16-tq4.pte", tokens, prefill=8)
    plain = _run(built / "qwen3-tq-mlx-bf16.pte", tokens, prefill=8)
    scale = np.abs(plain).max()
    assert 0 < np.abs(tq - plain).max() / scale <= TURBOQUANT_REL
    top2 = np.sort(plain, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > TURBOQUANT_REL * scale
    assert (tq.argmax(-1) == plain.argmax(-1))[decisive].all()


def test_the_runtime_follows_executorchs_turboquant_computation(built):
    """The artifact (kernels computed by mlx_runtime.kernels, in float32 as this runtime
    computes half precision on a CPU) against ExecuTorch's TurboQuant cache run eagerly in
    torch, in bf16, on the same model. Rounding moves a few values across the codebook's
    boundaries, so the two are not equal; but they are far closer than the compression
    error that separates either from the plain cache."""
    import backends
    from mlxbuild.families import hf, text_generation

    tokens = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(4))
    got = _run(built / "qwen3-tq-mlx-bf16-tq4.pte", tokens, prefill=8)

    weights = next((built.parent.parent.parent / "cache" / "weights").glob("*/*"))
    eager = {}
    for name in ("mlx-tq4", "mlx"):
        flavour = backends.flavour(name)
        model = hf.load_model(weights, "bf16", flavour.attention_implementation())
        programs, _ = text_generation.export(model, {"max_context_length": 64, "max_prefill_chunk": 64,
                                                     "dtype": "bf16"}, flavour)
        eager[name] = text_generation.run_pte(_Eager(programs["forward"].module()), tokens.numpy(), 8)

    def mean_rel(a, b):
        return float(np.abs(a - b).mean() / np.abs(eager["mlx"]).mean())

    compression = mean_rel(eager["mlx-tq4"], eager["mlx"])
    assert compression > 0.05
    assert mean_rel(got, eager["mlx-tq4"]) < 0.6 * compression
    assert mean_rel(got, eager["mlx"]) > 0.6 * compression


class _Eager:
    def __init__(self, module):
        self.module = module

    def run(self, method, inputs):
        with torch.no_grad():
            return [self.module(input_ids=inputs[0], cache_position=inputs[1])]


def test_the_turboquant_cache_is_a_third_of_the_bytes(built):
    """The programs' mutable state: the plain cache's bf16 keys and values against the
    packed indices and norms (0.25 + 1/head_dim of the bytes, here 0.27)."""
    import mlx_runtime

    def state_bytes(pte: Path) -> int:
        return sum(d.state_bytes() for d in mlx_runtime.load(pte).method("forward").delegates)

    plain = state_bytes(built / "qwen3-tq-mlx-bf16.pte")
    tq = state_bytes(built / "qwen3-tq-mlx-bf16-tq4.pte")
    assert 0.2 < tq / plain < 0.35, (tq, plain)


def test_turboquant_needs_bf16_and_head_dim_64(tmp_path, subprocess_env):
    manifest = {**MANIFEST, "model": {**MANIFEST["model"], "dtype": "fp32"},
                "targets": [MANIFEST["targets"][1]]}
    (tmp_path / "tq.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    p = subprocess.run(doit_command() + ["build", "tq.yaml"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env=subprocess_env(MLXBUILD_CACHE=tmp_path / "cache",
                                                       MLXBUILD_ARTIFACTS=tmp_path / "artifacts"))
    assert p.returncode != 0
    assert "turboquant" in p.stdout + p.stderr and "bf16" in p.stdout + p.stderr
    assert not (tmp_path / "artifacts" / "qwen3-tq").exists()
