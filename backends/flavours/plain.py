"""The ``plain`` export flavour: transformers' own attention and StaticCache, exported as
plain ``index_copy`` over buffers. What the portable, CoreML and CUDA backends lower
from; the reference flavour the others are checked against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# A gated delta net's recurrence has no plain ATen form a dynamic-length export can trace
# (a loop over the tokens): portable programs run ExecuTorch's CPU kernel for it, as the
# et-llm-ops flavour's programs do.
from backends.flavours.et_llm_ops import gated_delta_rule, gated_delta_state  # noqa: F401

NAME = "plain"


def attention_implementation() -> str | None:
    # ExecuTorch's CPU LLM ops (llama::gated_delta_rule, for gated delta nets), which a saved
    # program that uses them needs before it loads
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    return None


def install_cache(exportable, config, max_cache_len: int, prefill_chunk: int, dtype, *,
                  sliding: frozenset = frozenset(), experts=None) -> None:
    """transformers' StaticCache exports as it is, but its sliding layers keep a window-sized
    roll whose branch is picked by a Python counter at trace time: a chunk longer than the
    window cannot go through it. Where a chunk may exceed the window, a sliding layer gets a
    whole-context StaticLayer instead; transformers' sliding mask still limits what each
    query sees (by absolute position, which this layer keeps)."""
    if not sliding:
        return
    from transformers.cache_utils import StaticLayer

    text = config.get_text_config()
    if prefill_chunk <= text.sliding_window:
        return
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    cache = exportable.static_cache
    for i in sliding:
        layer = StaticLayer(max_cache_len=max_cache_len)
        shape = (1, text.num_key_value_heads, max_cache_len, head_dim)
        layer.keys, layer.values = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
        layer.dtype, layer.device = dtype, layer.keys.device
        layer.batch_size, layer.num_heads = 1, text.num_key_value_heads
        layer.k_head_dim = layer.v_head_dim = head_dim
        layer.is_initialized = True
        cache.layers[i] = layer
        # The wrapper registered the old tensors as buffers; point them at the new ones.
        setattr(exportable, f"key_cache_{i}", layer.keys)
        setattr(exportable, f"value_cache_{i}", layer.values)
        if hasattr(exportable, f"cumulative_length_{i}"):
            setattr(exportable, f"cumulative_length_{i}", layer.cumulative_length)


class DecoderCache(torch.nn.Module):
    """Self-attention KV cache for a family's own decoder modules (Whisper's): BHSD
    buffers written with index_copy_; attention masks what is not yet written."""

    def __init__(self, heads: int, head_dim: int, max_len: int, dtype):
        super().__init__()
        self.register_buffer("k", torch.zeros(1, heads, max_len, head_dim, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(1, heads, max_len, head_dim, dtype=dtype), persistent=False)

    def attend(self, q, k, v, start, positions):
        self.k.index_copy_(2, positions, k)
        self.v.index_copy_(2, positions, v)
        slots = torch.arange(self.k.shape[2], device=q.device)
        mask = slots.view(1, -1) <= positions.view(-1, 1)  # [T, L]: causal over the cache
        return F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=mask, scale=1.0)
