"""The plan's memory estimate per step and the budget a build keeps to (``mlxbuild.memory``):
an oversized step fails before it starts, naming its estimate and the budget; with ``-n 2``
two steps that don't fit together run one after the other."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from itertools import combinations
from pathlib import Path

import pytest

from buildlog import TINY_SOURCE, doit_command
from mlxbuild import memory
from mlxbuild.build import plan_manifests
from mlxbuild.settings import Roots

MANIFEST = f"""\
name: mem
version: 0.1.0
model:
{TINY_SOURCE}  dtype: fp32
export: {{max_context_length: 32}}
quality: {{enabled: false}}
quantization:
  8w: {{linear: {{bits: 8, group_size: 32}}}}
targets:
  - {{name: mlx-fp32, backend: mlx}}
  - {{name: mlx-8w, backend: mlx, quantization: 8w}}
"""
BIG = """\
name: big
version: 0.1.0
model:
  source:
    synthetic:
      architecture: qwen3
      seed: 0
      config: {vocab_size: 151936, hidden_size: 1024, intermediate_size: 3072, num_hidden_layers: 28,
               num_attention_heads: 16, num_key_value_heads: 8, head_dim: 128, tie_word_embeddings: true}
  dtype: bf16
export: {max_context_length: 64}
quantization:
  4w: {linear: {bits: 4, group_size: 32}, embedding: {bits: 4, group_size: 32}}
targets:
  - {name: mlx-4w, backend: mlx, quantization: 4w}
  - {name: xnnpack-fp32, backend: xnnpack, dtype: fp32}
"""


def _build(root: Path, env_for, *args: str) -> subprocess.CompletedProcess:
    env = env_for(MLXBUILD_CACHE=root / "cache", MLXBUILD_ARTIFACTS=root / "artifacts")
    return subprocess.run([*doit_command(), "build", "--plain", "--report", "r.json", *args, "m.yaml"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)


def _heavy_steps(root: Path) -> list[dict]:
    report = json.loads((root / "r.json").read_text())
    steps = {s["task"]: s for t in report["manifests"][0]["targets"] for s in t["steps"]}
    return [s for s in steps.values() if (s.get("memory_estimate_mb") or 0) >= 300 and s["status"] == "ran"]


def _overlaps(steps: list[dict]) -> list[tuple[str, str]]:
    return [(a["task"], b["task"]) for a, b in combinations(steps, 2)
            if a["start"] < b["start"] + b["seconds"] and b["start"] < a["start"] + a["seconds"]]


def test_estimates_follow_parameters_dtype_and_width(tmp_path):
    (tmp_path / "m.yaml").write_text(BIG)
    plan = plan_manifests([str(tmp_path / "m.yaml")], Roots(cache=tmp_path / "c", artifacts=tmp_path / "a"))
    by = {s.name.split(":")[0] + ":" + s.label: s.memory for s in plan.steps.values()}
    params = memory.model_shape(next(s for s in plan.steps.values() if s.kind == "weights").params.load)["params"]
    assert 590e6 < params < 610e6  # Qwen3-0.6B: 596M with its tied embedding
    q_bf16 = next(s for s in plan.steps.values() if s.kind == "quantize" and s.params.dtype == "bf16")
    q_fp32 = next(s for s in plan.steps.values() if s.kind == "quantize" and s.params.dtype == "fp32")
    # streamed: the quantized state (int8 codes, a bf16 scale and an int8 zero point per 32)
    # and the largest piece (the embedding) in bf16
    q = params * (1 + 3 / 32)
    assert memory.quantized_bytes_per_param({"linear": {"bits": 4, "group_size": 32}}, "bf16") == 1 + 3 / 32
    slope, fixed = memory.LINE["quantize"]
    assert q_bf16.memory == int(memory.PROCESS_DEFAULT + fixed * memory.MB * min(1, q / memory.Q_REF) + slope * q
                                + 151936 * 1024 * 2)
    # an unquantized scheme has nothing to quantize: its quantize step reads nothing
    assert q_fp32.memory == memory.PROCESS_DEFAULT
    # ... but its export holds the fp32 model where the 4-bit one holds the quantized state
    export = {s.params.dtype: s.memory for s in plan.steps.values() if s.kind == "export"}
    assert export["fp32"] - export["bf16"] == pytest.approx(memory.LINE["export"][0] * params * (4 - (1 + 3 / 32)),
                                                            rel=1e-3)
    # GPTQ loads the whole float model
    assert memory.streams({"linear": {"bits": 4}}) and not memory.streams({"linear": {"bits": 4}, "method": "gptq"})
    # verification runs the program: its line is over the artifact, 4 bits and a scale and a
    # zero point per 32 against 4 bytes a parameter, and ExecuTorch's runtime (XNNPACK) holds
    # it about once where MLX's holds it twice
    verify = {s.label: s.memory for s in plan.steps.values() if s.kind == "verify"}

    def line(coefficients, a):
        return memory.PROCESS_DEFAULT + coefficients[1] * memory.MB * min(1, a / memory.A_REF) + coefficients[0] * a

    assert verify["big/mlx-4w"] == pytest.approx(line(memory.LINE["verify"], params * (0.5 + 4 / 32)), rel=1e-6)
    assert verify["big/xnnpack-fp32"] == pytest.approx(line(memory.VERIFY_ET_LINE, params * 4), rel=1e-6)
    assert memory.VERIFY_ET_LINE[0] < memory.LINE["verify"][0]
    # the synthetic weights are generated a piece at a time: the embedding is the largest
    weights = next(s for s in plan.steps.values() if s.kind == "weights")
    assert weights.memory == int(memory.PROCESS_DEFAULT + 151936 * 1024 * (4 + 2 + memory.INIT_WORK_BYTES))
    assert all(s.memory == 0 for s in plan.steps.values() if s.kind in ("package", "tokenizer")), by


def test_a_checkpoint_is_measured_from_its_headers(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="20KB")
    assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) > 1
    shape = memory.model_shape({"path": str(tmp_path / "ckpt")})
    assert shape == {"params": sum(p.numel() for p in model.parameters()), "piece": 96 * 32}


def test_sizes_parse_and_a_bad_budget_is_a_usage_error(tmp_path, subprocess_env):
    assert memory.parse_size("800M") == 800 * 2**20 and memory.parse_size("1.5GB") == int(1.5 * 2**30)
    assert memory.parse_size("512MiB") == 512 * 2**20 and memory.parse_size("4096") == 4096
    assert memory.parse_size("50%") == memory.physical_memory() // 2
    (tmp_path / "m.yaml").write_text(MANIFEST)
    p = _build(tmp_path, subprocess_env, "--memory-budget", "lots")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "MLXBUILD_MEMORY_BUDGET: 'lots': expected a size such as 12G, 800M or 75%" in p.stderr
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("weights/*"))


def test_a_step_over_the_budget_fails_before_it_starts(tmp_path, subprocess_env):
    (tmp_path / "m.yaml").write_text(MANIFEST)
    p = _build(tmp_path, subprocess_env, "--memory-budget", "300M")
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    line = next(ln for ln in (p.stdout + p.stderr).splitlines() if "memory budget" in ln)
    assert "weights mem (fp32): needs an estimated 400 MB, over the memory budget of 300 MB" in line, line
    assert "(--memory-budget or MLXBUILD_MEMORY_BUDGET)" in line
    # refused when planned: not after the steps before it have run
    assert "more step(s) too; nothing was run (--target builds the others)" in line, line
    assert not list((tmp_path / "cache").glob("*/*"))  # no step ran, not even the tokenizer
    assert not (tmp_path / "artifacts" / "mem").exists()


def test_steps_that_do_not_fit_together_run_one_after_the_other(tmp_path, subprocess_env):
    """Same manifest, -n 2: with room for every step (a large budget) some heavy steps of
    the two targets overlap; with room for one (700 MB: each estimate is 400-540 MB) none do."""
    for name, budget in (("roomy", "100G"), ("tight", "700M")):
        root = tmp_path / name
        root.mkdir()
        (root / "m.yaml").write_text(MANIFEST)
        p = _build(root, subprocess_env, "-n", "2", "--memory-budget", budget)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        heavy = _heavy_steps(root)
        assert len(heavy) >= 8, heavy
        if name == "roomy":
            assert _overlaps(heavy), "with -n 2 and room for both, steps should run side by side"
            assert not any(s.get("waited") for s in heavy)
        else:
            assert not _overlaps(heavy), _overlaps(heavy)
            assert any(s.get("waited") for s in heavy) and "waiting for memory" in p.stdout + p.stderr
            # once built, a budget below its steps' estimates refuses nothing: they don't run
            again = _build(root, subprocess_env, "--memory-budget", "300M")
            assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]


def test_the_ledger_waits_for_room_and_forgets_dead_holders(tmp_path):
    held = threading.Event()
    release = threading.Event()

    def hold():
        with memory.reserve(tmp_path, 600, 1000, "first"):
            held.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(5)
    notes = []
    threading.Timer(0.6, release.set).start()
    start = time.monotonic()
    with memory.reserve(tmp_path, 600, 1000, "second", on_wait=notes.append):
        waited = time.monotonic() - start
    t.join()
    assert waited >= 0.5 and len(notes) == 1 and "waiting for memory" in notes[0]
    # an entry left by a process that died does not hold the budget
    ledger = tmp_path / "locks" / "memory.json"
    ledger.write_text(json.dumps({"gone": {"pid": 2**22 + 12345, "bytes": 900, "step": "x"}}))
    start = time.monotonic()
    with memory.reserve(tmp_path, 600, 1000, "third"):
        assert time.monotonic() - start < 0.5
    with pytest.raises(memory.OverBudget, match="x: needs an estimated"):
        with memory.reserve(tmp_path, 2000, 1000, "x"):
            pass
