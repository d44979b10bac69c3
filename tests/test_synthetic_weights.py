"""Synthetic weights generated a piece at a time (``mlxbuild.stages.weights``): the same
checkpoint layout ``save_pretrained`` writes, Hugging Face's own initialization, bytes that
don't depend on the order of generation, shards with their index, and memory bounded by
the largest piece rather than the model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mlxbuild.families.hf import load_model
from mlxbuild.stages import weights
from recipes import qwen3_moe, whisper

QWEN = {"architecture": "qwen3", "seed": 3,
        "config": {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                   "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                   "tie_word_embeddings": True}}
WHISPER = whisper(32)
MOE = qwen3_moe(16)


def _files(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _write(tmp_path: Path, recipe: dict, dtype=torch.float32, name: str = "w") -> Path:
    out = tmp_path / name
    out.mkdir()
    weights.write_synthetic(recipe, dtype, out)
    return out


@pytest.mark.parametrize("recipe", [QWEN, WHISPER, MOE], ids=["qwen3", "whisper", "qwen3_moe"])
def test_a_tensor_does_not_depend_on_the_order_of_generation(recipe):
    ahead = dict(weights.synthetic_tensors(recipe, torch.float32))
    behind = dict(weights.synthetic_tensors(recipe, torch.float32, reverse=True))
    assert list(ahead) and set(ahead) == set(behind)
    assert all(torch.equal(ahead[k], behind[k]) for k in ahead)
    # ... and a different seed gives different tensors
    other = dict(weights.synthetic_tensors({**recipe, "seed": recipe["seed"] + 1}, torch.float32))
    assert not torch.equal(ahead[next(k for k in ahead if k.endswith("q_proj.weight"))],
                           other[next(k for k in ahead if k.endswith("q_proj.weight"))])


@pytest.mark.parametrize("recipe", [QWEN, WHISPER, MOE], ids=["qwen3", "whisper", "qwen3_moe"])
def test_the_checkpoint_is_what_save_pretrained_writes_and_loads_back(tmp_path, recipe):
    """Names and shapes as Hugging Face saves the model (a tied tensor once, MoE experts as
    the checkpoint stores them), and from_pretrained loads it back to the same tensors."""
    import transformers
    from transformers import AutoConfig

    from mlxbuild.families import auto_class_name, model_type_of

    out = _write(tmp_path, recipe)
    config = AutoConfig.for_model(model_type_of(recipe["architecture"]), **recipe["config"])
    ref = getattr(transformers, auto_class_name(config.model_type)).from_config(config)
    ref.save_pretrained(tmp_path / "ref")
    ours, theirs = _files(out), _files(tmp_path / "ref")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    (out / "source.json").write_text(json.dumps({"load": {"synthetic": recipe}, "dtype": "fp32"}))
    model = load_model(out, "fp32")
    loaded = model.state_dict()
    generated = dict(weights.synthetic_tensors(recipe, torch.float32))
    same = [k for k in generated if k in loaded]
    assert same and all(torch.equal(loaded[k], generated[k]) for k in same)


def test_initialization_is_the_architectures_own():
    q = dict(weights.synthetic_tensors(QWEN, torch.float32))
    assert torch.equal(q["model.norm.weight"], torch.ones(32))  # RMSNorm: ones
    assert abs(q["model.layers.1.mlp.up_proj.weight"].std().item() - 0.02) < 0.004  # initializer_range
    assert "lm_head.weight" not in q  # tied: saved once, as the embedding
    w = dict(weights.synthetic_tensors(WHISPER, torch.float32))
    from transformers.models.whisper.modeling_whisper import sinusoids

    # the encoder's init writes sinusoids over its position embedding's normal init
    assert torch.allclose(w["model.encoder.embed_positions.weight"], sinusoids(20, 32))
    assert torch.equal(w["model.encoder.layers.0.self_attn.q_proj.bias"], torch.zeros(32))
    gemma = {"architecture": "gemma3", "seed": 0,
             "config": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "sliding_window": 8}}
    g = dict(weights.synthetic_tensors(gemma, torch.float32))
    assert torch.equal(g["model.norm.weight"], torch.zeros(32))  # Gemma's norms scale by 1 + weight


def test_bf16_and_shards_with_their_index(tmp_path, monkeypatch):
    single = _write(tmp_path, QWEN, torch.bfloat16, "single")
    assert sorted(p.name for p in single.glob("*.safetensors")) == ["model.safetensors"]
    monkeypatch.setattr(weights, "SHARD_BYTES", 16 * 1024)
    sharded = _write(tmp_path, QWEN, torch.bfloat16, "sharded")
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    a, b = _files(single), _files(sharded)
    assert set(index["weight_map"]) == set(a) == set(b)
    assert all(a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in a.values())
    for name, shard in index["weight_map"].items():
        with safe_open(str(sharded / shard), "pt") as h:
            assert name in h.keys()


def test_memory_is_bounded_by_a_piece_not_the_model(tmp_path):
    """A 168M-parameter model (672 MB in fp32) generated in fp32: the process peaks well
    under what holding the model would take (measured against the same process that only
    lays the model out)."""
    recipe = {"architecture": "llama", "seed": 0,
              "config": {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 4096,
                         "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
                         "tie_word_embeddings": False}}
    code = ("import sys, json, torch; from pathlib import Path; from mlxbuild.stages import weights as w; "
            "from mlxbuild.child import peak_rss; "
            "r = json.loads(sys.argv[1]); m = w.synthetic_layout(r); "
            "sys.argv[2] == 'write' and w.write_synthetic(r, torch.float32, Path(sys.argv[3])); print(peak_rss())")

    def peak(mode: str) -> int:
        out = tmp_path / mode
        out.mkdir()
        p = subprocess.run([sys.executable, "-c", code, json.dumps(recipe), mode, str(out)],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        return int(p.stdout.split()[-1])

    base, written = peak("layout"), peak("write")
    model_bytes = sum(f.stat().st_size for f in (tmp_path / "write").glob("*.safetensors"))
    assert model_bytes > 650e6
    # the largest piece is an embedding or lm_head: 32000 x 1024 x 4 B = 131 MB
    assert written - base < 0.45 * model_bytes, (written - base, model_bytes)
