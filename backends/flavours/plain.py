"""The ``plain`` export flavour: transformers' own attention and StaticCache, exported as
plain ``index_copy`` over buffers. What the portable, CoreML and CUDA backends lower
from; the reference flavour the others are checked against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "plain"


def attention_implementation() -> str | None:
    return None


def install_cache(exportable, config, max_cache_len: int, prefill_chunk: int, dtype, *,
                  sliding: frozenset = frozenset(), experts=None) -> None:
    pass  # transformers' StaticCache (rings for sliding layers included) exports as it is


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
