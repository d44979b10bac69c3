"""The recurrent family (mlxbuild.families.gated_delta): Qwen3.5's gated delta net layers
with their states as mutable buffers.

Each export flavour's program (before lowering: torch.export's own module) is run over
a prefill and 32 single-token decode steps and compared with transformers' own model and
cache (its chunked prefill and per-token recurrent kernels), then restarted at position
0; the states are shown to be carried (zeroing them changes the next step) and reset.
Lowered artifacts are built and checked in tests/test_families_text.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

PREFILL, DECODE = 8, 32
CONTEXT = 64


def tiny_config():
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, full_attention_interval=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32, linear_conv_kernel_dim=4,
        max_position_embeddings=256)


def models(flavour_name: str):
    """The model as the export stage loads it (the flavour's attention) and transformers'
    own, with the same weights."""
    import backends
    from mlxbuild.families import hf
    from transformers import Qwen3_5ForCausalLM

    torch.manual_seed(0)
    reference = Qwen3_5ForCausalLM(tiny_config()).eval()
    # A_log and dt_bias away from their init, so the gates differ per head
    with torch.no_grad():
        for m in reference.modules():
            if hasattr(m, "A_log"):
                m.A_log.uniform_(-1.0, 1.0)
                m.dt_bias.uniform_(-1.0, 1.0)
    flavour = backends.flavour(flavour_name)
    attention = flavour.attention_implementation()
    config = copy.deepcopy(reference.config)
    model = Qwen3_5ForCausalLM._from_config(config, attn_implementation=attention) if attention \
        else Qwen3_5ForCausalLM(config)
    model.load_state_dict(reference.state_dict())
    return hf.prepare(model.eval()), reference, flavour


def exported(flavour_name: str):
    from mlxbuild.families import text_generation

    model, reference, flavour = models(flavour_name)
    params = {"max_context_length": CONTEXT, "max_prefill_chunk": CONTEXT, "dtype": "fp32"}
    programs, _ = text_generation.export(model, params, flavour)
    return programs["forward"], reference


def run(forward, ids, prefill: int):
    with torch.no_grad():
        rows = [forward(input_ids=ids[:, :prefill], cache_position=torch.arange(prefill))[0]]
        for pos in range(prefill, ids.shape[1]):
            rows.append(forward(input_ids=ids[:, pos:pos + 1], cache_position=torch.tensor([pos]))[0])
    return torch.cat(rows)


def transformers_logits(reference, ids, prefill: int):
    """transformers' own generation path: its hybrid cache, a chunked prefill, then
    per-token recurrent steps."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=reference.config)
    with torch.no_grad():
        rows = [reference(input_ids=ids[:, :prefill], past_key_values=cache, use_cache=True).logits[0]]
        for pos in range(prefill, ids.shape[1]):
            rows.append(reference(input_ids=ids[:, pos:pos + 1], past_key_values=cache, use_cache=True).logits[0])
    return torch.cat(rows)


@pytest.mark.parametrize("flavour_name", ["mlx", "et-llm-ops", "plain"])
def test_exported_recurrence_matches_transformers(flavour_name):
    program, reference = exported(flavour_name)
    ids = torch.randint(0, 128, (1, PREFILL + DECODE), generator=torch.Generator().manual_seed(1))
    want = transformers_logits(reference, ids, PREFILL)
    # every linear-attention layer's two states are program state (mutated in place)
    states = {n for n in program.graph_signature.buffers if n.endswith(("conv_state", "recurrent_state"))}
    assert len(states) == 2 * 3, program.graph_signature.buffers
    forward = program.module()
    got = run(forward, ids, PREFILL)
    assert got.shape == want.shape == (PREFILL + DECODE, 128)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # a new conversation at position 0 starts from zero states, not the last one's
    other = torch.randint(0, 128, (1, PREFILL + 4), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(run(forward, other, PREFILL), transformers_logits(reference, other, PREFILL),
                               rtol=1e-4, atol=1e-5)


def test_the_states_are_carried_between_calls():
    program, _ = exported("plain")
    forward = program.module()
    ids = torch.randint(0, 128, (1, PREFILL + 1), generator=torch.Generator().manual_seed(3))
    carried = run(forward, ids, PREFILL)[-1]
    states = [b for name, b in forward.named_buffers() if name.endswith("recurrent_state")]
    assert len(states) == 3 and all(s.abs().sum() > 0 for s in states)
    with torch.no_grad():
        forward(input_ids=ids[:, :PREFILL], cache_position=torch.arange(PREFILL))
        for s in states:
            s.zero_()  # as if the prefill had never reached the recurrent layers
        dropped = forward(input_ids=ids[:, PREFILL:], cache_position=torch.tensor([PREFILL]))[0, -1]
    assert (dropped - carried).abs().max() > 1e-3
    torch.testing.assert_close(run(forward, ids, PREFILL)[-1], carried)


def test_a_hybrid_model_is_recognised_by_its_layer_types():
    from mlxbuild.families import gated_delta
    from transformers import Qwen3_5ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    model = Qwen3_5ForCausalLM(tiny_config())
    assert gated_delta.is_hybrid(model) and len(gated_delta.layers(model)) == 3
    dense = Qwen3ForCausalLM(Qwen3Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    assert not gated_delta.is_hybrid(dense) and gated_delta.layers(dense) == []
