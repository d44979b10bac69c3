"""Text decoder families: Llama 3.x, Gemma 3 (sliding window), Qwen3-MoE and Qwen3.5
(gated delta net layers with recurrent state).

One `doit build -n 2` (module fixture, run as a subprocess like a user would) builds
the four shipped tiny manifests with their targets trimmed to the cheap ones that
still cover every path: MLX (4-bit for Llama and the MoE's gather_qmm, fp32 for
Gemma) and XNNPACK fp32. The checks then go beyond the build's own verification:
artifacts are run here (MLX through `mlx_runtime`, XNNPACK through
`executorch.runtime`) and compared with transformers' own, untransformed model
(fused MoE experts with its routing loop; Gemma's sliding-window masks), over a
prompt plus decode that runs far past Gemma's 8-token window.

The full shipped manifests (8da4w XNNPACK and portable targets too) build in the
`slow` test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from buildlog import doit_command, validate_with_target
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
VERSION = "0.1.0"
# Shipped manifest -> the targets the default run builds: (name, backend, scheme).
FAST_TARGETS = {
    "llama3-tiny": [("mlx-4w", "mlx", "4w"), ("xnnpack-fp32", "xnnpack", "none")],
    "gemma3-tiny": [("mlx-fp32", "mlx", "none"), ("xnnpack-fp32", "xnnpack", "none")],
    "qwen3-moe-tiny": [("mlx-4w", "mlx", "4w"), ("xnnpack-fp32", "xnnpack", "none")],
    "qwen3.5-tiny": [("mlx-4w", "mlx", "4w"), ("xnnpack-fp32", "xnnpack", "none")],
}
WINDOW, CONTEXT = 8, 32  # gemma3-tiny's sliding window and context


def trimmed(name: str, targets) -> dict:
    manifest = yaml.safe_load((REPO / "manifests" / f"{name}.yaml").read_text())
    schemes = {scheme for _, _, scheme in targets}
    manifest["quantization"] = {k: v for k, v in manifest["quantization"].items() if k in schemes}
    manifest["targets"] = [{"name": t, "backend": b, "quantization": s} for t, b, s in targets]
    return manifest


class Built:
    def __init__(self, root: Path):
        self.root = root
        self.cache, self.artifacts = root / "cache", root / "artifacts"

    def pte(self, name: str, target: str) -> Path:
        return self.artifacts / name / VERSION / f"{name}-{target}.pte"

    def record(self, name: str, target: str) -> dict:
        return json.loads(self.pte(name, target).with_suffix(".json").read_text())

    def entry(self, kind: str, key: str) -> Path:
        return self.cache / kind / key[:2] / key

    def weights(self, name: str, target: str) -> Path:
        return self.entry("weights", self.record(name, target)["keys"]["weights"])


@pytest.fixture(scope="module")
def built(tmp_path_factory, subprocess_env) -> Built:
    root = tmp_path_factory.mktemp("families")
    (root / "manifests").mkdir()
    paths = []
    for name, targets in FAST_TARGETS.items():
        path = root / "manifests" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(trimmed(name, targets), sort_keys=False))
        paths.append(str(path.relative_to(root)))
    ws = Built(root)
    p = subprocess.run(doit_command() + ["build", "-n", "2", *paths], cwd=root, capture_output=True,
                       text=True, timeout=900,
                       env=subprocess_env(MLXBUILD_CACHE=ws.cache, MLXBUILD_ARTIFACTS=ws.artifacts))
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return ws


# --------------------------------------------------------------------------- helpers


def hf_model(weights: Path, **config_overrides):
    """transformers' own model from the build's weights entry: no mlxbuild transform."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(weights)
    for k, v in config_overrides.items():
        setattr(config, k, v)
    return AutoModelForCausalLM.from_pretrained(weights, config=config, dtype=torch.float32).eval()


def eager_quantized(built: Built, name: str, target: str):
    """The eager model quantized by the target's scheme, as mlxbuild's quantize step left it."""
    from mlxbuild.families import hf
    from mlxbuild.stages import quantize

    record = built.record(name, target)
    model = hf.load_model(built.weights(name, target), record["dtype"])
    quantize.load_into(model, built.entry("quantize", record["keys"]["quantize"]))
    return model


def hf_greedy(model, prompt: list[int], new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                             min_new_tokens=new, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def run_artifact(pte: Path, tokens: np.ndarray, prefill: int) -> np.ndarray:
    """Prefill `prefill` tokens, then feed the rest one by one (teacher forcing);
    every position's logits. MLX programs run on our runtime, the rest on ExecuTorch's."""
    if "-mlx-" in pte.name:
        import mlx_runtime

        program = mlx_runtime.load(pte)
        execute = lambda inputs: program.run("forward", inputs)  # noqa: E731
    else:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
        import executorch.kernels.quantized  # noqa: F401
        from executorch.runtime import Runtime

        execute = Runtime.get().load_program(str(pte)).load_method("forward").execute
    ids = torch.from_numpy(tokens)
    rows = [torch.as_tensor(execute([ids[:, :prefill], torch.arange(prefill)])[0])[0]]
    for pos in range(prefill, ids.shape[1]):
        rows.append(torch.as_tensor(execute([ids[:, pos:pos + 1], torch.tensor([pos])])[0])[0])
    return torch.cat(rows).float().numpy()


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def sequence(vocab: int, n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (1, n)).astype(np.int64)


def mlx_nodes(pte: Path) -> Counter:
    import mlx_runtime

    counts = Counter()
    for runner in mlx_runtime.load(pte).method("forward").delegates:
        counts.update(runner.node_counts())
    return counts


# --------------------------------------------------------------------------- every family


@pytest.mark.parametrize("name,target", [(n, t) for n, ts in FAST_TARGETS.items() for t, _, _ in ts])
def test_target_verified_against_eager(built, name, target):
    record = built.record(name, target)
    v = record["verification"]
    assert v["passed"] and v["executed"], v
    assert v["max_rel_error"] <= v["tolerance"]["max_rel_error"], v
    assert v["top1_agreement_decisive"] == 1.0, v
    assert v["positions"] == 12  # 8-token prefill + 4 decode steps
    if target.startswith("xnnpack"):
        # ExecuTorch's TextLLMRunner drove the artifact too: a prompt past Gemma's window,
        # its own chunked prefill, generation to the context limit, token for token.
        runner = v["runner"]
        assert runner["passed"] and "skipped" not in runner, runner
        assert runner["prompt_tokens"] > WINDOW
        assert runner["new_tokens"] == runner["expected_new_tokens"]
        assert runner["prompt_tokens"] + runner["new_tokens"] <= record["constant_methods"]["get_max_context_len"]
        assert runner["matched"] == runner["new_tokens"] or "near tie" in runner.get("note", "")
    assert record["source"]["synthetic"]["architecture"] == yaml.safe_load(
        (REPO / "manifests" / f"{name}.yaml").read_text())["model"]["source"]["synthetic"]["architecture"]


# --------------------------------------------------------------------------- Llama 3


def test_llama3_rope_scaling_reaches_the_model(built):
    config = json.loads((built.weights("llama3-tiny", "mlx-4w") / "config.json").read_text())
    rope = config.get("rope_parameters") or config.get("rope_scaling")
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0


def test_llama3_mlx_greedy_tokens_match_eager(built):
    import mlx_runtime
    from mlxbuild.families import decoding

    prompt = sequence(512, 6, seed=3)[0].tolist()
    model = eager_quantized(built, "llama3-tiny", "mlx-4w")
    want = hf_greedy(model, prompt, 20)
    got = decoding.generate(mlx_runtime.load(built.pte("llama3-tiny", "mlx-4w")), prompt, 20,
                               stop_at_eos=False)["tokens"]
    assert got == want


def test_llama3_xnnpack_matches_transformers(built):
    tokens = sequence(512, 24)
    with torch.no_grad():
        ref = hf_model(built.weights("llama3-tiny", "xnnpack-fp32"))(torch.from_numpy(tokens)).logits[0].numpy()
    got = run_artifact(built.pte("llama3-tiny", "xnnpack-fp32"), tokens, prefill=16)
    assert rel_error(got, ref) < 1e-4


# --------------------------------------------------------------------------- Gemma 3


@pytest.fixture(scope="module")
def gemma_reference(built):
    """transformers' Gemma over a whole 32-token context (sliding masks), and the same
    model with the window removed: the test can tell a window from none."""
    weights = built.weights("gemma3-tiny", "mlx-fp32")
    tokens = sequence(512, CONTEXT)
    with torch.no_grad():
        ref = hf_model(weights)(torch.from_numpy(tokens)).logits[0].numpy()
        unwindowed = hf_model(weights, sliding_window=10 * CONTEXT)(
            torch.from_numpy(tokens)).logits[0].numpy()
    # Windowing changes nothing up to the window and a lot after it.
    assert rel_error(unwindowed[:WINDOW], ref[:WINDOW]) < 1e-5
    assert rel_error(unwindowed[WINDOW:], ref[WINDOW:]) > 1e-2
    return tokens, ref


@pytest.mark.parametrize("target", ["mlx-fp32", "xnnpack-fp32"])
def test_gemma3_decodes_past_the_window(built, gemma_reference, target):
    """Prefill one window, then decode to the end of the context: 24 steps, the ring of
    2 x 8 - 1 slots wraps twice. Every position matches transformers."""
    tokens, ref = gemma_reference
    got = run_artifact(built.pte("gemma3-tiny", target), tokens, prefill=WINDOW)
    assert got.shape == ref.shape
    assert rel_error(got, ref) < 1e-4, [rel_error(got[i:i + 1], ref[i:i + 1]) for i in range(CONTEXT)]


def test_gemma3_mlx_greedy_tokens_match_transformers(built):
    import mlx_runtime
    from mlxbuild.families import decoding

    prompt = sequence(512, WINDOW, seed=5)[0].tolist()
    want = hf_greedy(hf_model(built.weights("gemma3-tiny", "mlx-fp32")), prompt, CONTEXT - WINDOW)
    got = decoding.generate(mlx_runtime.load(built.pte("gemma3-tiny", "mlx-fp32")), prompt,
                               CONTEXT - WINDOW, stop_at_eos=False)["tokens"]
    assert got == want


def test_gemma3_prefill_chunk_below_the_context_is_a_manifest_error(tmp_path):
    """TextLLMRunner's contract holds for sliding-window models too: forward takes the
    whole context (the rings are sized for it), so a smaller chunk is refused at its line."""
    manifest = (REPO / "manifests" / "gemma3-tiny.yaml").read_text()
    assert "max_prefill_chunk" not in manifest
    bad = tmp_path / "gemma.yaml"
    bad.write_text(manifest.replace("  max_context_length: 32\n", "  max_context_length: 32\n  max_prefill_chunk: 8\n"))
    line = next(i for i, t in enumerate(bad.read_text().splitlines(), 1) if "max_prefill_chunk: 8" in t)
    p = subprocess.run([sys.executable, "-m", "mlxbuild.cli", "validate", str(bad)],
                       capture_output=True, text=True)
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()
    assert len(err) == 1, p.stderr
    assert f"gemma.yaml:{line}:" in err[0]
    assert "export.max_prefill_chunk: 8 is below max_context_length (32): ExecuTorch's TextLLMRunner" in err[0]
    bad.write_text(bad.read_text().replace("max_prefill_chunk: 8", "max_prefill_chunk: 32"))
    p = subprocess.run([sys.executable, "-m", "mlxbuild.cli", "validate", str(bad)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_checkpoint_chunk_is_checked_at_export():
    """Hub and local checkpoints are seen only when loaded: the same rule at export."""
    from transformers import AutoConfig

    from mlxbuild.errors import BuildError
    from mlxbuild.families.hf import check_prefill_chunk, sliding_layers

    config = AutoConfig.for_model("gemma3_text", sliding_window=16, num_hidden_layers=6)
    assert sliding_layers(config) == {0, 1, 2, 3, 4}
    check_prefill_chunk(config, 64, 64)
    with pytest.raises(BuildError, match=r"export.max_prefill_chunk: 16 is below max_context_length \(64\)"):
        check_prefill_chunk(config, 16, 64)
    assert not sliding_layers(AutoConfig.for_model("qwen3"))


# --------------------------------------------------------------------------- Qwen3-MoE


MOE_LAYERS = 2


def test_moe_mlx_routes_through_gather_qmm(built):
    nodes = mlx_nodes(built.pte("qwen3-moe-tiny", "mlx-4w"))
    # gate, up and down of each sparse layer, 4-bit: one GatherQmm each, no dense expert matmuls.
    assert nodes["GatherQmmNode"] == 3 * MOE_LAYERS, nodes
    assert nodes["GatherMmNode"] == 0, nodes


def test_moe_experts_are_quantized_by_the_linear_rule(built):
    layers = built.record("qwen3-moe-tiny", "mlx-4w")["layer_quantization"]["layers"]
    experts = {n: q for n, q in layers.items() if ".mlp.experts." in n}
    # 2 layers x 3 projections x 4 experts, each its own 4-bit linear.
    assert len(experts) == MOE_LAYERS * 3 * 4, sorted(layers)
    assert {(q["format"], q["bits"], q["rule"]) for q in experts.values()} == {("affine", 4, "linear")}
    assert "model.layers.1.mlp.experts.down_proj.3" in experts


def test_moe_mlx_greedy_tokens_match_eager(built):
    import mlx_runtime
    from mlxbuild.families import decoding

    prompt = sequence(512, 10, seed=7)[0].tolist()
    want = hf_greedy(eager_quantized(built, "qwen3-moe-tiny", "mlx-4w"), prompt, 20)
    got = decoding.generate(mlx_runtime.load(built.pte("qwen3-moe-tiny", "mlx-4w")), prompt, 20,
                               stop_at_eos=False)["tokens"]
    assert got == want


def test_moe_xnnpack_matches_transformers_routing(built):
    """Against transformers' fused experts and its own routing loop (no mlxbuild.families.moe)."""
    weights = built.weights("qwen3-moe-tiny", "xnnpack-fp32")
    model = hf_model(weights)
    assert type(model.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    tokens = sequence(512, 24, seed=2)
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens)).logits[0].numpy()
    got = run_artifact(built.pte("qwen3-moe-tiny", "xnnpack-fp32"), tokens, prefill=16)
    assert rel_error(got, ref) < 1e-4


def test_unfused_experts_compute_what_transformers_does():
    from transformers import AutoConfig, AutoModelForCausalLM

    from mlxbuild.families.moe import ExpertLinears, unfuse_experts

    config = AutoConfig.for_model("qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64,
                                  moe_intermediate_size=16, num_experts=5, num_experts_per_tok=2,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                  head_dim=16, norm_topk_prob=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        ref = model(ids).logits
        assert unfuse_experts(model) == 1
        got = model(ids).logits
    assert isinstance(model.model.layers[0].mlp.experts, ExpertLinears)
    assert len(model.model.layers[0].mlp.experts.down_proj) == 5
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- Qwen3.5 (recurrent)

QWEN35_DECODE = 32


def test_qwen35_xnnpack_matches_transformers_over_32_decode_steps(built):
    """A prefill, then 32 single-token steps carrying the recurrent states through the
    artifact, against transformers' own model over the whole sequence at once (its
    chunked gated delta rule)."""
    tokens = sequence(512, 8 + QWEN35_DECODE, seed=7)
    with torch.no_grad():
        ref = hf_model(built.weights("qwen3.5-tiny", "xnnpack-fp32"))(torch.from_numpy(tokens)).logits[0].numpy()
    got = run_artifact(built.pte("qwen3.5-tiny", "xnnpack-fp32"), tokens, prefill=8)
    assert got.shape == ref.shape
    assert rel_error(got, ref) < 1e-4


def test_qwen35_mlx_greedy_tokens_match_transformers(built):
    """32 greedy tokens through the MLX artifact (the recurrence as ExecuTorch's fused Metal
    kernel, which our runtime computes with mlx ops here) equal transformers' generate on the
    same 4-bit model with its own cache."""
    import mlx_runtime
    from mlxbuild.families import decoding

    prompt = sequence(512, 8, seed=9)[0].tolist()
    model = eager_quantized(built, "qwen3.5-tiny", "mlx-4w")
    want = hf_greedy(model, prompt, QWEN35_DECODE)
    pte = built.pte("qwen3.5-tiny", "mlx-4w")
    got = decoding.generate(mlx_runtime.load(pte), prompt, QWEN35_DECODE, stop_at_eos=False)["tokens"]
    assert got == want
    assert mlx_nodes(pte)["MetalKernelNode"] == 3  # one gated_delta_step per gated delta layer


def test_qwen35_refuses_backends_that_cannot_lower_it(tmp_path):
    code, line, path = validate_with_target(tmp_path, REPO / "manifests" / "qwen3.5-tiny.yaml",
                                            {"name": "coreml-fp16", "backend": "coreml", "quantization": "none"})
    assert code != 0
    assert f"{path}:" in line and "targets[0].backend" in line and "cannot be built for 'coreml'" in line


# --------------------------------------------------------------------------- shipped manifests


@pytest.mark.slow
def test_shipped_tiny_manifests_build_and_verify(tmp_path, subprocess_env):
    names = list(FAST_TARGETS)
    (tmp_path / "manifests").mkdir()
    for name in names:
        shutil.copy(REPO / "manifests" / f"{name}.yaml", tmp_path / "manifests")
    ws = Built(tmp_path)
    p = subprocess.run(doit_command() + ["build", "-n", "2", *[f"manifests/{n}.yaml" for n in names]],
                       cwd=tmp_path, capture_output=True, text=True, timeout=3600,
                       env=subprocess_env(MLXBUILD_CACHE=ws.cache, MLXBUILD_ARTIFACTS=ws.artifacts))
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    for name in names:
        targets = [t["name"] for t in yaml.safe_load((REPO / "manifests" / f"{name}.yaml").read_text())["targets"]]
        assert {"mlx", "xnnpack"} <= {t.split("-")[0] for t in targets}
        for target in targets:
            v = ws.record(name, target)["verification"]
            assert v["passed"] and v["max_rel_error"] <= v["tolerance"]["max_rel_error"], (name, target, v)
    assert mlx_nodes(ws.pte("qwen3-moe-tiny", "mlx-fp32"))["GatherMmNode"] == 3 * MOE_LAYERS
