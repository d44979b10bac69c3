"""The record's `runtime_requirements`, read from the program, are what loading needs:
an XNNPACK LLM program fails to load without the kernel libraries it names and loads with
them; a portable fp32 program needs none; `mlxbuild inspect` prints them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from buildlog import doit_command

MANIFEST = """\
name: req-tiny
version: 0.1.0
model:
  source:
    synthetic:
      architecture: qwen3
      seed: 0
      config: {vocab_size: 128, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
               num_attention_heads: 2, num_key_value_heads: 1, head_dim: 16,
               max_position_embeddings: 256, tie_word_embeddings: true, bos_token_id: 1,
               eos_token_id: 2}
  dtype: fp32
export: {max_context_length: 32}
quantization:
  8da4w:
    linear: {bits: 4, group_size: 32, activations: int8_dynamic}
    embedding: {bits: 8, group_size: per_channel}
targets:
  - {name: xnnpack-8da4w, backend: xnnpack, quantization: 8da4w}
  - {name: portable-fp32, backend: portable, quantization: none}
"""

# Load a program with executorch.runtime after importing exactly the modules named.
LOAD = """\
import importlib, sys
for name in sys.argv[2:]:
    importlib.import_module(name)
from executorch.runtime import Runtime
Runtime.get().load_program(sys.argv[1]).load_method("forward")
print("loaded")
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory, subprocess_env):
    root = tmp_path_factory.mktemp("req")
    (root / "req.yaml").write_text(MANIFEST)
    env = subprocess_env(MLXBUILD_CACHE=root / "cache", MLXBUILD_ARTIFACTS=root / "artifacts")
    p = subprocess.run([*doit_command(), "build", "req.yaml"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return root / "artifacts" / "req-tiny" / "0.1.0", env


def _load(pte: Path, imports: list[str], env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOAD, str(pte), *imports], env=env,
                          capture_output=True, text=True, timeout=300)


def test_xnnpack_needs_exactly_what_its_record_names(built):
    out, env = built
    pte = out / "req-tiny-xnnpack-8da4w.pte"
    req = json.loads(pte.with_suffix(".json").read_text())["runtime_requirements"]
    assert req["python_imports"] == ["executorch.extension.llm.custom_ops.custom_ops", "executorch.kernels.quantized"]
    assert [b["backend_id"] for b in req["backends"]] == ["XnnpackBackend"]
    libs = {lib["namespace"]: lib for lib in req["kernel_libraries"]}
    assert "llama::update_cache.out" in libs["llama"]["operators"]
    assert libs["quantized_decomposed"]["cmake_target"] == "quantized_ops_lib"
    assert req["data_files"] == [] and req["unknown_operator_namespaces"] == []

    imports = req["python_imports"]
    assert _load(pte, imports, env).stdout.strip() == "loaded"
    for missing in imports:  # without either library, loading fails on its operators
        p = _load(pte, [i for i in imports if i != missing], env)
        assert p.returncode != 0 and "loaded" not in p.stdout, missing
        namespace = {"executorch.extension.llm.custom_ops.custom_ops": "llama::",
                     "executorch.kernels.quantized": "quantized_decomposed::"}[missing]
        assert f"Missing operator" in p.stderr + p.stdout and namespace in p.stderr + p.stdout, p.stderr[-2000:]


def test_portable_fp32_needs_nothing_but_the_runtime(built):
    out, env = built
    pte = out / "req-tiny-portable-fp32.pte"
    req = json.loads(pte.with_suffix(".json").read_text())["runtime_requirements"]
    assert req["python_imports"] == [] and req["backends"] == []
    assert {lib["namespace"] for lib in req["kernel_libraries"]} <= {"aten", "dim_order_ops"}
    assert _load(pte, [], env).stdout.strip() == "loaded"


def test_inspect_prints_the_requirements(built, capsys):
    from mlxbuild.cli import main

    out, _ = built
    assert main(["inspect", str(out / "req-tiny-xnnpack-8da4w.pte")]) == 0
    text = capsys.readouterr().out
    assert "runtime requirements:" in text
    assert ("  kernels llama:: (2 ops): LLM custom ops; Python: import executorch.extension.llm.custom_ops.custom_ops; "
            "C++: link custom_ops") in text.splitlines()
    assert "  backend XnnpackBackend: C++: link xnnpack_backend; in ExecuTorch's Linux wheel" in text.splitlines()
