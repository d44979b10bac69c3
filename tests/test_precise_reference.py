"""References computed once more without their own rounding (float32 arithmetic, int8
dynamic activations left unquantized), and the rule PyTorch's own accuracy checks use for
low precision: an artifact over the table's tolerance is still faithful where it is no
further from the precise logits than ``PRECISE_MULTIPLIER`` times the eager model is."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlxbuild.families import common, text_generation

TOL = {"max_rel_error": 0.04, "min_top1_agreement": 1.0}


def _logits(seed: int, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(6, 50)).astype(np.float32) * scale


def test_an_error_within_the_references_own_passes_and_a_bug_does_not():
    exact = _logits(0) * 5
    exact[:, 7] += 30  # a decisive winner at every position
    ref = exact + _logits(1, 0.5)   # eager bf16: 0.5-ish off float32
    good = exact + _logits(2, 0.5)  # the artifact: as far off, elsewhere
    rel = np.abs(good - ref).max() / np.abs(ref).max()
    assert rel > TOL["max_rel_error"]  # the table alone would fail it
    assert not common.compare(good, ref, TOL)["passed"]
    result = common.compare(good, ref, TOL, exact)
    assert result["passed"], result["reason"]
    f32 = result["precise_reference"]
    assert f32["artifact_rel_error"] <= 2 * f32["reference_rel_error"]
    assert result["allowed_rel_error"] == 3 * f32["reference_rel_error"]
    # a wrong artifact (a logit column moved) is far from both
    bad = good.copy()
    bad[:, 3] += 4
    failed = common.compare(bad, ref, TOL, exact)
    assert not failed["passed"]
    assert "from the precise logits against the reference's own" in failed["reason"]
    # a wrong reference (every 7th column moved by the largest logit) excuses nothing, even
    # where the artifact is close to the precise logits
    wrong = ref.copy()
    wrong[:, ::7] += np.abs(ref).max()
    assert not common.compare(good, wrong, TOL, exact)["passed"]


def _tiny(dtype, scheme):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from mlxbuild.quantize import apply_scheme

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, tie_word_embeddings=True)).eval().to(dtype)
    if scheme:
        apply_scheme(model, scheme)
    return model


def test_the_reference_writes_float32_logits_for_a_quantized_bf16_model(tmp_path):
    model = _tiny(torch.bfloat16, {"linear": {"bits": 4, "group_size": 32},
                                   "embedding": {"bits": 4, "group_size": 32}})
    assert common.precise_pass_applies(model)
    params = {"max_context_length": 32, "prompt": 8, "decode_steps": 4, "seed": 0}
    text_generation.reference(model, params, tmp_path)
    bf16, f32 = np.load(tmp_path / "logits.npy"), np.load(tmp_path / common.PRECISE_LOGITS)
    assert bf16.shape == f32.shape == (12, 256)
    rel = np.abs(bf16 - f32).max() / np.abs(f32).max()
    assert 1e-4 < rel < 0.05, rel  # bf16's own rounding, not another model
    # the model is bf16 again afterwards (the runner reference runs it next)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # fed the same tokens in float32 from scratch in one prefill, behind a cache as long as
    # they are: the same figures; step by step as the eager pass runs (behind the short cache
    # or the context's), the same to float32's rounding: the attention sums the same terms in
    # another order
    tokens = torch.from_numpy(np.load(tmp_path / "tokens.npy"))
    one = {**params, "max_context_length": 12, "prompt": 12, "decode_steps": 0}
    _, again = common.precisely(model, lambda: text_generation._decode(model, one, tokens))
    assert np.array_equal(again.numpy(), f32)
    for steps in ({**params, "max_context_length": 12}, params):
        _, stepped = common.precisely(model, lambda: text_generation._decode(model, steps, tokens))
        np.testing.assert_allclose(stepped.numpy(), f32, rtol=0, atol=1e-5 * np.abs(f32).max())


def test_no_float32_pass_for_float32_or_mostly_unquantized_models():
    assert not common.precise_pass_applies(_tiny(torch.float32, {"linear": {"bits": 4, "group_size": 32}}))
    assert not common.precise_pass_applies(_tiny(torch.bfloat16, None))


def test_the_reference_of_int8_dynamic_activations_is_also_run_unquantized(tmp_path):
    model = _tiny(torch.float32, {"linear": {"bits": 4, "group_size": 32, "activations": "int8_dynamic"}})
    assert common.precise_pass_applies(model)
    params = {"max_context_length": 32, "prompt": 8, "decode_steps": 4, "seed": 0}
    text_generation.reference(model, params, tmp_path)
    rounded, precise = np.load(tmp_path / "logits.npy"), np.load(tmp_path / common.PRECISE_LOGITS)
    rel = np.abs(rounded - precise).max() / np.abs(precise).max()
    assert 1e-4 < rel < 0.2, rel  # the activations' int8 rounding, the same weight codes
    # the weights quantize their activations again afterwards
    assert all(p.activation_quantization == "int8_asym_per_token" for p in model.parameters()
               if hasattr(p, "activation_quantization"))
    # unquantized activations are what the weight-only form of the same codes computes
    from torchao.quantization import IntxUnpackedToInt8Tensor

    for m in model.modules():
        w = m._parameters.get("weight")
        if isinstance(w, IntxUnpackedToInt8Tensor):
            m.weight = torch.nn.Parameter(IntxUnpackedToInt8Tensor(
                w.qdata, w.scale, w.zero_point, w.target_dtype, w.block_size, w.dtype, None), requires_grad=False)
    # (in one prefill behind a cache as long as the tokens fed, as the precise pass runs)
    one = {**params, "max_context_length": 12, "prompt": 12, "decode_steps": 0}
    _, again = text_generation._decode(model, one, torch.from_numpy(np.load(tmp_path / "tokens.npy")))
    assert np.array_equal(again.numpy(), precise)


def test_the_precise_pass_dequantizes_a_block_of_rows_at_a_time(monkeypatch):
    """torchao dequantizes a whole weight at every call; in float32 a large head's temporaries
    were the reference step's peak. The precise pass dequantizes a linear's weight a block of
    rows at a time and an embedding's looked-up rows only, and computes what the whole
    weight computes."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    model = _tiny(torch.bfloat16, {"linear": {"bits": 4, "group_size": 32},
                                   "embedding": {"bits": 4, "group_size": 32}})
    params = {"max_context_length": 32, "prompt": 8, "decode_steps": 4, "seed": 0}
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    _, whole = common.precisely(model, lambda: text_generation._decode(model, params, tokens))
    # 64 columns of float32: 16 rows a block, so the 256-row head takes 16 blocks
    monkeypatch.setattr(common, "PRECISE_BLOCK_BYTES", 16 * 64 * 4)
    seen = []
    dequantize = IntxUnpackedToInt8Tensor.dequantize
    monkeypatch.setattr(IntxUnpackedToInt8Tensor, "dequantize",
                        lambda self: seen.append(tuple(self.shape)) or dequantize(self))

    def decode():
        # no whole float32 copy of a quantized weight's scales: its blocks widen theirs
        quantized = [p for p in model.parameters() if isinstance(p, IntxUnpackedToInt8Tensor)]
        assert quantized and all(p.scale.dtype == torch.bfloat16 and p.dtype == torch.float32 for p in quantized)
        return text_generation._decode(model, params, tokens)

    _, blocked = common.precisely(model, decode)
    assert seen and max(rows for rows, _ in seen) <= 16, sorted(set(seen))[-3:]
    assert (8, 64) in seen and (1, 64) in seen  # the prompt's rows, then one token's
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-5)
    # the model's own forwards are back: bf16, torchao's whole-weight path
    assert not any("forward" in vars(m) for m in model.modules())
    seen.clear()
    text_generation._decode(model, params, tokens)
    assert (256, 64) in seen


# ----------------------------------------------------------------------------- the eager pass, leaner


@pytest.mark.parametrize("dtype,scheme", [
    (torch.bfloat16, {"linear": {"bits": 4, "group_size": 32}, "embedding": {"bits": 4, "group_size": 32}}),
    (torch.float32, {"linear": {"bits": 4, "group_size": 32, "activations": "int8_dynamic"},
                     "embedding": {"bits": 8, "group_size": "per_channel"}}),
    (torch.float16, {"linear": {"bits": 8, "group_size": "per_channel"}, "embedding": {"bits": 2, "group_size": 16}}),
], ids=["bf16-4w", "fp32-8da4w", "fp16-8w-2w"])
def test_the_lean_eager_pass_computes_torchaos_logits_bit_for_bit(dtype, scheme):
    """The reference's eager pass dequantizes each weight with fewer passes and an embedding's
    looked-up rows only (``common.leanly``): the very logits torchao's forwards give."""
    model = _tiny(dtype, scheme)
    params = {"max_context_length": 32, "prompt": 8, "decode_steps": 4, "seed": 0}
    tokens = text_generation.prompt_tokens(256, 8, 0)
    fed, theirs = text_generation._decode(model, params, tokens)
    calls = []
    real = common._lean

    def counted(module):
        lean = real(module)
        if lean is not None:
            calls.append(type(module).__name__)
        return lean

    import unittest.mock as mock

    with mock.patch.object(common, "_lean", counted):
        fed2, ours = common.leanly(model, lambda: text_generation._decode(model, params, tokens))
    assert "Embedding" in calls and "Linear" in calls  # the lean forwards ran
    assert torch.equal(fed, fed2) and torch.equal(theirs, ours)
    assert not any("forward" in vars(m) for m in model.modules())  # torchao's forwards back


def test_the_lean_dequantization_keeps_nonzero_zero_points():
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_api import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.quant_primitives import MappingType

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16, bias=True).to(torch.bfloat16)
    emb = torch.nn.Embedding(40, 64).to(torch.bfloat16)
    model = torch.nn.ModuleDict({"lin": lin, "emb": emb})
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(16),
                                          mapping_type=MappingType.ASYMMETRIC),
              filter_fn=lambda m, fqn: isinstance(m, (torch.nn.Linear, torch.nn.Embedding)))
    assert lin.weight.zero_point.any()
    ids = torch.tensor([[3, 39, 0, 3]])
    x = torch.randn(5, 64).to(torch.bfloat16)
    want = (emb(ids), lin(x))
    got = common.leanly(model, lambda: (emb(ids), lin(x)))
    assert all(torch.equal(a, b) for a, b in zip(want, got))
