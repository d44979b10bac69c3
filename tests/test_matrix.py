"""The backend × scheme × dtype matrix on a tiny Qwen3: what the capability table accepts
builds (and verifies), what it refuses is refused at validation with its reason.

Valid combinations are built together, one manifest per dtype with one target per
(backend, scheme), so every (scheme, flavour) is exported once, with `doit build -n 2`
as a subprocess exactly as a user runs it. The default run covers each scheme family at
fp32 on every backend that builds here; `-m slow` adds every other dtype once per backend
(~30 s), Core ML and Vulkan artifacts rebuilt in a second process with a second cache, which
must come out byte-identical (~26 s), and the whole cross-product. Refusals are checked
in-process with `parse_manifest` (fast).

CUDA cannot lower on this host (tests/test_backends.py checks that it says so).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from buildlog import doit_command

import backends
import yaml

from backends import capabilities
from mlxbuild.errors import ManifestError
from mlxbuild.manifest import parse_manifest

REPO = Path(__file__).resolve().parent.parent
BUILDABLE = tuple(b for b in capabilities.SUPPORTED_BACKENDS if b != "cuda")

MODEL = {
    "source": {"synthetic": {"architecture": "qwen3", "seed": 0, "config": {
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 256, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2}}},
    "task": "text-generation",
}
EXPORT = {"max_context_length": 32}
PROMPT = 8  # the verification-style prefill these tests feed


def _affine(bits, group):
    return {"bits": bits, "group_size": group}


# Every quantization format, by name: weight-only affine on both layer kinds at each
# bits × group size, affine on embeddings only (what portable and XNNPACK take),
# int8 dynamic activations on linears, nvfp4.
SCHEMES: dict[str, dict | None] = {"none": None}
for _bits in (2, 4, 8):
    for _group in (32, 64, 128, "per_channel"):
        _g = "pc" if _group == "per_channel" else _group
        SCHEMES[f"w{_bits}g{_g}"] = {"linear": _affine(_bits, _group), "embedding": _affine(_bits, _group)}
for _bits in (2, 4, 8):
    SCHEMES[f"e{_bits}"] = {"embedding": _affine(_bits, 32)}
SCHEMES["8da4w"] = {"linear": {**_affine(4, 32), "activations": "int8_dynamic"}}
SCHEMES["8da8w"] = {"linear": {**_affine(8, "per_channel"), "activations": "int8_dynamic"}}
SCHEMES["nvfp4"] = {"linear": {"format": "nvfp4"}, "embedding": {"format": "nvfp4"}}

# The default run: one scheme per format family (the other bits and group sizes are -m slow).
FAMILIES = ("none", "w4g32", "e4", "8da4w", "nvfp4")


def _scheme_obj(name: str):
    if SCHEMES[name] is None:
        return None
    text = yaml.safe_dump(manifest_dict("fp32", [("portable", "none")], {name: SCHEMES[name]}))
    return parse_manifest(text).quantization[name]


def problems(backend: str, scheme: str, dtype: str) -> list[tuple[str, str]]:
    return capabilities.check(backend, _scheme_obj(scheme), dtype)


def valid(backend: str, scheme: str, dtype: str) -> bool:
    return not problems(backend, scheme, dtype)


def manifest_dict(dtype: str, pairs, schemes: dict | None = None) -> dict:
    names = sorted({s for _, s in pairs if s != "none"})
    return {
        "name": f"matrix-{dtype}", "version": "0.1.0",
        "model": {**MODEL, "dtype": dtype}, "export": EXPORT,
        "quantization": schemes if schemes is not None else {n: SCHEMES[n] for n in names},
        "targets": [{"name": f"{b}-{s}", "backend": b, "quantization": s} for b, s in pairs],
    }


def default_pairs(dtype: str) -> list[tuple[str, str]]:
    """fp32: every backend × scheme family it supports. Other dtypes: the first family
    each backend supports at that dtype (so each supported dtype is built once)."""
    pairs = []
    for b in BUILDABLE:
        ok = [s for s in FAMILIES if valid(b, s, dtype)]
        pairs += [(b, s) for s in (ok if dtype == "fp32" else ok[:1])]
    return pairs


def full_pairs(dtype: str) -> list[tuple[str, str]]:
    return [(b, s) for b in BUILDABLE for s in SCHEMES if valid(b, s, dtype)]


# --------------------------------------------------------------------------- building


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(root: Path, env_for, manifests: dict[str, dict], timeout: float = 3600):
    """Write the manifests under `root` and build them all in one `doit build -n 2`."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in manifests.items():
        (root / name).write_text(yaml.safe_dump(data, sort_keys=False))
        paths.append(name)
    env = env_for(MLXBUILD_CACHE=root / "cache", MLXBUILD_ARTIFACTS=root / "artifacts")
    start = time.monotonic()
    p = subprocess.run(doit_command() + ["build", "-n", "2", *paths], cwd=root, env=env,
                       capture_output=True, text=True, timeout=timeout)
    took = time.monotonic() - start
    assert p.returncode == 0, (f"exit {p.returncode} after {took:.0f} s\n--- stdout ---\n"
                               f"{p.stdout[-6000:]}\n--- stderr ---\n{p.stderr[-6000:]}")
    return root / "artifacts"


def check_artifacts(artifacts: Path, dtype: str, pairs) -> None:
    out = artifacts / f"matrix-{dtype}" / "0.1.0"
    for backend, scheme in pairs:
        stem = out / f"matrix-{dtype}-{backend}-{scheme}"
        record = json.loads(stem.with_suffix(".json").read_text())
        assert record["backend"] == backend and record["dtype"] == dtype
        verification = record["verification"]
        assert verification["passed"], (backend, scheme, verification)
        delegates = record["delegation"]["forward"]["delegates"]
        if backend == "portable":
            assert delegates == []
        else:
            assert delegates, (backend, scheme, "nothing delegated")
        structural = delegate_module(backend).VERIFY == "structural"
        # Structural checks say so: the program was inspected, not run.
        assert verification["executed"] is (not structural), (backend, scheme, verification)
        if structural:
            coverage = verification["coverage"]
            assert coverage["delegated_ops"] > 0 and 0 < coverage["delegated_fraction"] <= 1
        if getattr(delegate_module(backend), "LLM_RUNNER", False):
            # ExecuTorch's bundled checker has a tolerance for float32/float16 logits only;
            # bf16 programs get no .bpte rather than one that fails on every device.
            bundled = verification["bundled_program"]
            if dtype == "bf16":
                assert "skipped" in bundled and not stem.with_suffix(".bpte").exists()
            else:
                assert bundled["passed"] and bundled["dtype"] == {"fp32": "float32", "fp16": "float16"}[dtype]
                assert stem.with_suffix(".bpte").is_file()


def delegate_module(name: str):
    import backends

    return backends.backend(name)


@pytest.fixture(scope="module")
def fp32_matrix(tmp_path_factory, subprocess_env):
    """Every backend × scheme family at fp32, built once for the module."""
    root = tmp_path_factory.mktemp("matrix")
    pairs = default_pairs("fp32")
    return build(root, subprocess_env, {"fp32.yaml": manifest_dict("fp32", pairs)}), pairs


def test_every_valid_family_builds_at_fp32(fp32_matrix):
    artifacts, pairs = fp32_matrix
    assert {b for b, _ in pairs} == set(BUILDABLE)
    check_artifacts(artifacts, "fp32", pairs)


# slow: ~30 s; per-target dtypes stay in the default run (tests/test_dtype_per_target.py).
@pytest.mark.slow
def test_every_supported_dtype_builds_once_per_backend(tmp_path, subprocess_env):
    manifests = {f"{d}.yaml": manifest_dict(d, default_pairs(d)) for d in ("fp16", "bf16")}
    for d in ("fp16", "bf16"):
        assert {b for b, _ in default_pairs(d)} == {b for b in BUILDABLE
                                                    if d in capabilities.get(b).dtypes}
    artifacts = build(tmp_path, subprocess_env, manifests)
    for d in ("fp16", "bf16"):
        check_artifacts(artifacts, d, default_pairs(d))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", capabilities.DTYPES)
def test_full_cross_product_builds(dtype, tmp_path, subprocess_env):
    pairs = full_pairs(dtype)
    artifacts = build(tmp_path, subprocess_env, {f"{dtype}.yaml": manifest_dict(dtype, pairs)})
    check_artifacts(artifacts, dtype, pairs)


# --------------------------------------------------------------------------- reproducible bytes


# slow: ~26 s (Core ML and Vulkan lowered again in a second process with a second cache).
@pytest.mark.slow
def test_coreml_and_vulkan_bytes_are_reproducible(fp32_matrix, tmp_path, subprocess_env):
    """A second build, in another process with another cache, gives the same bytes."""
    first, pairs = fp32_matrix
    again = [(b, s) for b, s in pairs if (b, s) in (("coreml", "w4g32"), ("vulkan", "8da4w"))]
    assert {b for b, _ in again} == {"coreml", "vulkan"}
    second = build(tmp_path, subprocess_env, {"fp32.yaml": manifest_dict("fp32", again)})
    for backend, scheme in again:
        name = f"matrix-fp32/0.1.0/matrix-fp32-{backend}-{scheme}.pte"
        assert sha256(first / name) == sha256(second / name), f"{backend}-{scheme} differs"


def test_structural_check_finds_a_missing_delegate(fp32_matrix):
    """The Core ML check run on a Vulkan program (and back) fails, naming what is missing."""
    from mlxbuild.pte_inspect import inspect_pte

    artifacts, _ = fp32_matrix
    out = artifacts / "matrix-fp32" / "0.1.0"
    vulkan = inspect_pte(out / "matrix-fp32-vulkan-none.pte")
    coreml = inspect_pte(out / "matrix-fp32-coreml-none.pte")
    result = backends.check_structure("coreml", vulkan)
    assert not result["passed"] and not result["executed"]
    assert "CoreMLBackend delegate missing" in result["reason"]
    assert "VulkanBackend delegate missing" in backends.check_structure("vulkan", coreml)["reason"]
    assert backends.check_structure("coreml", coreml)["passed"]


def test_payload_checks_reject_garbage():
    assert delegate_module("coreml").payload_problem(b"\0" * 64)
    assert delegate_module("vulkan").payload_problem(b"\0" * 64)


def test_vulkan_payload_with_an_infinite_constant_is_read():
    """A causal mask's -inf is written by flatc as a bare `-inf`, which ExecuTorch's own reader
    (json.load) refuses; the structural check reads it (the multimodal decoders have one)."""
    import torch
    from executorch.backends.vulkan.partitioner.vulkan_partitioner import VulkanPartitioner
    from executorch.backends.vulkan.serialization.vulkan_graph_serialize import (
        extract_vk_flatbuffer, flatbuffer_to_vk_graph)
    from executorch.exir import to_edge_transform_and_lower

    class Masked(torch.nn.Module):
        def forward(self, x):
            return torch.softmax(x + torch.full((4, 4), float("-inf")).triu(1), dim=-1)

    ep = torch.export.export(Masked(), (torch.randn(4, 4),))
    program = to_edge_transform_and_lower(ep, partitioner=[VulkanPartitioner()]).to_executorch().executorch_program
    payload = bytes(program.backend_delegate_data[program.execution_plan[0].delegates[0].processed.index].data)
    with pytest.raises(ValueError):  # what the check works around
        flatbuffer_to_vk_graph(extract_vk_flatbuffer(payload))
    assert delegate_module("vulkan").payload_problem(payload) == ""


# --------------------------------------------------------------------------- refusals


INVALID = [(b, s, d) for b in capabilities.SUPPORTED_BACKENDS for s in SCHEMES
           for d in capabilities.DTYPES if not valid(b, s, d)]


def test_the_table_refuses_something_on_every_backend():
    assert {b for b, _, _ in INVALID} == set(capabilities.SUPPORTED_BACKENDS)


@pytest.mark.parametrize("backend,scheme,dtype", INVALID, ids=["-".join(c) for c in INVALID])
def test_invalid_combination_is_refused_at_validation(backend, scheme, dtype):
    text = yaml.safe_dump(manifest_dict(dtype, [(backend, scheme)]), sort_keys=False)
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, "matrix.yaml")
    err = info.value
    assert str(err).count("\n") == 0
    assert err.file == "matrix.yaml" and err.field.startswith("targets[0].")
    # The manifest reports the table's own reason.
    field, message = problems(backend, scheme, dtype)[0]
    assert message in str(err)
    if field in ("dtype", "backend"):
        assert err.field == "targets[0].backend"
    else:
        assert err.field == "targets[0].quantization" and field in str(err)
