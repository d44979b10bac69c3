"""The Core ML, Vulkan and CUDA targets: their options, and CUDA's refusal on a host
that cannot lower for it. (Building them is tests/test_matrix.py.)"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import backends
from backends import capabilities
from mlxbuild.errors import ManifestError
from mlxbuild.manifest import parse_manifest

BASE = """\
name: opts
version: 0.1.0
model:
  source:
    synthetic: {architecture: qwen3, seed: 0, config: {hidden_size: 64}}
  dtype: fp32
export: {max_context_length: 32}
targets:
  - name: t
    backend: BACKEND
    options: OPTIONS
"""


def parse(backend: str, options: str):
    return parse_manifest(BASE.replace("BACKEND", backend).replace("OPTIONS", options), "m.yaml")


def test_new_backends_are_registered():
    for name in ("coreml", "vulkan", "cuda"):
        module = backends.backend(name)
        # CUDA lowers only where a GPU is (preflight), and its programs run there.
        assert module.NAME == name and module.VERIFY == ("runtime" if name == "cuda" else "structural")
        assert module.FLAVOUR in ("plain", "et-llm-ops")
        assert name in capabilities.SUPPORTED_BACKENDS
        assert backends.flavour(module.FLAVOUR).NAME == module.FLAVOUR


@pytest.mark.parametrize("backend,options,expected", [
    ("coreml", "{}", {"compute_units": "cpu_only", "precision": "fp16",
                      "minimum_deployment_target": "iOS18", "model_type": "model"}),
    ("coreml", "{compute_units: cpu_and_ne, precision: fp32, minimum_deployment_target: macOS15}",
     {"compute_units": "cpu_and_ne", "precision": "fp32", "minimum_deployment_target": "macOS15"}),
    ("vulkan", "{force_fp16: true, texture_limits: [4096, 4096, 1024], skip_ops: [aten.embedding.default]}",
     {"force_fp16": True, "texture_limits": (4096, 4096, 1024), "skip_ops": ["aten.embedding.default"]}),
    ("cuda", "{device: 'cuda:1', max_autotune: true}", {"device": "cuda:1", "max_autotune": True}),
])
def test_options_parse(backend, options, expected):
    opts = parse(backend, options).targets[0].backend_options()
    assert {k: getattr(opts, k) for k in expected} == expected


@pytest.mark.parametrize("backend,options,message", [
    ("coreml", "{compute_units: gpu}",
     "m.yaml:11:15: targets[0].options.compute_units: 'gpu' is not allowed; expected one of: "
     "'cpu_only', 'cpu_and_gpu', 'cpu_and_ne' or 'all'"),
    ("coreml", "{precision: int8}",
     "m.yaml:11:15: targets[0].options.precision: 'int8' is not allowed; expected one of: 'fp16' or 'fp32'"),
    ("coreml", "{minimum_deployment_target: iOS14}",
     "m.yaml:11:15: targets[0].options.minimum_deployment_target: 'iOS14' is not allowed; expected one "
     "of: 'iOS15', 'iOS16', 'iOS17', 'iOS18', 'iOS26', 'macOS12', 'macOS13', 'macOS14', 'macOS15' or 'macOS26'"),
    ("coreml", "{model_type: binary}",
     "m.yaml:11:15: targets[0].options.model_type: 'binary' is not allowed; expected one of: 'model' or "
     "'compiled_model'"),
    ("coreml", "{units: all}",
     "m.yaml:11:15: targets[0].options.units: unknown option 'units' for backend 'coreml'; allowed: "
     "compute_units, precision, minimum_deployment_target, model_type"),
    ("vulkan", "{texture_limits: [1, 2]}",
     "m.yaml:11:15: targets[0].options.texture_limits: expected 3 extents [x, y, z], got 2"),
    ("vulkan", "{force_fp16: maybe}",
     "m.yaml:11:15: targets[0].options.force_fp16: expected a boolean, got a string ('maybe')"),
    ("vulkan", "{buffer_limit: 0}", "m.yaml:11:15: targets[0].options.buffer_limit: must be > 0, got 0"),
    ("cuda", "{device: gpu0}",
     "m.yaml:11:15: targets[0].options.device: 'gpu0' does not match the pattern ^cuda(:\\d+)?$"),
])
def test_bad_options_are_one_line_errors(backend, options, message):
    with pytest.raises(ManifestError) as info:
        parse(backend, options)
    assert str(info.value) == message


def test_vulkan_skip_ops_name_edge_ops():
    from backends import vulkan
    from backends.errors import BackendError

    assert "embedding" in str(vulkan._edge_op("aten.embedding.default"))
    with pytest.raises(BackendError, match="no edge op named 'aten.nope.default'"):
        vulkan._edge_op("aten.nope.default")


# --------------------------------------------------------------------------- cuda on this host

CUDA_HOST = bool(torch.version.cuda) and torch.cuda.is_available() and importlib.util.find_spec("triton")


@pytest.mark.skipif(CUDA_HOST, reason="this host can lower for CUDA")
def test_cuda_preflight_names_what_is_missing():
    from backends import cuda
    from backends.errors import BackendError

    with pytest.raises(BackendError) as info:
        backends.preflight("cuda")
    text = str(info.value)
    assert text.startswith("backend 'cuda' cannot lower on this host: ")
    assert "\n" not in text
    for problem in cuda.missing():
        assert problem in text
    assert "triton" in text


@pytest.mark.skipif(CUDA_HOST, reason="this host can lower for CUDA")
def test_cuda_build_fails_before_any_step(tmp_path, subprocess_env):
    manifest = BASE.replace("BACKEND", "cuda").replace("OPTIONS", "{}").replace(
        "targets:\n", "targets:\n  - {name: cpu, backend: portable}\n")
    (tmp_path / "cuda.yaml").write_text(manifest)
    cache, artifacts = tmp_path / "cache", tmp_path / "artifacts"
    doit = Path(sys.executable).with_name("doit")
    p = subprocess.run([str(doit), "build", "-n", "2", "cuda.yaml"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300,
                       env=subprocess_env(MLXBUILD_CACHE=cache, MLXBUILD_ARTIFACTS=artifacts))
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: backend 'cuda' cannot lower on this host: "), p.stderr
    assert "triton" in lines[0]
    assert not p.stdout.strip(), p.stdout  # no step started (not even the portable target's)
    assert not cache.exists() and not artifacts.exists()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["cuda.yaml"]


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS hosts can compile Core ML models")
def test_coreml_compiled_model_needs_macos():
    from backends import coreml
    from backends.errors import BackendError

    with pytest.raises(BackendError, match="compiled_model' needs macOS"):
        coreml.lower({}, {"model_type": "compiled_model"}, {})
