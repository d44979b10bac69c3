"""The ``et-llm-ops`` export flavour: HF attention and KV cache that use ExecuTorch's own
LLM custom ops (what the XNNPACK and Vulkan backends lower from).

`llama::update_cache` writes new keys/values into a BSHD cache in place and
`llama::custom_sdpa` attends over the cache up to `start_pos + seq_len` with
causal masking, so the exported graph carries neither a mask tensor sized to
the context nor an index_copy over the whole cache. XNNPACK programs run these
as portable custom kernels (``executorch.extension.llm.custom_ops``).

We write these ourselves rather than depend on optimum-executorch, which pins
its own transformers and executorch releases.
"""

from __future__ import annotations

import torch

NAME = "et-llm-ops"
ATTENTION_NAME = "mlxbuild_et_sdpa"


def _ensure_ops_loaded() -> None:
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  registers torch.ops.llama.*


def et_sdpa_forward(module, query, key, value, attention_mask, position_ids=None,
                    scaling=None, softcap=None, head_mask=None, sliding_window=None, **kwargs):
    # key/value arrive as the whole BSHD cache returned by the cache layer's update.
    if softcap is not None or head_mask is not None or kwargs.get("dropout"):
        raise ValueError("ExecuTorch custom SDPA supports neither softcap, head_mask nor dropout")
    start_pos = position_ids[0][0].item()
    seq_len = query.shape[2]
    torch._check(start_pos >= 0)
    q = query.transpose(1, 2)
    if sliding_window is not None:
        # A sliding layer's cache is a ring (see _ring_update): every slot may be live,
        # so attend over all of them through a mask of window and causality.
        mask = ring_window_mask(start_pos, seq_len, key.shape[1], sliding_window)
        out = torch.ops.llama.custom_sdpa(q, key, value, 0, mask, 0.0, False, scaling)
        return out, None
    torch._check(start_pos + seq_len <= key.shape[1])
    out = torch.ops.llama.custom_sdpa(q, key, value, start_pos, None, 0.0, True, scaling)
    return out, None


def ring_window_mask(start_pos, seq_len: int, slots: int, window: int) -> torch.Tensor:
    """Additive float mask [seq_len, slots] for queries at start_pos.. over a ring of
    `slots` entries where position p lives in slot p % slots.

    Computed from start_pos alone (no position buffer, no data-dependent branch): after
    writing positions < end, slot s holds the latest p < end with p % slots == s, which
    is negative when nothing was written there yet. A query at q sees p when
    q - window < p <= q."""
    end = start_pos + seq_len
    slot = torch.arange(slots, dtype=torch.long)
    held = slot + slots * torch.div(end - 1 - slot, slots, rounding_mode="floor")
    query = (start_pos + torch.arange(seq_len, dtype=torch.long)).unsqueeze(1)
    distance = query - held
    visible = (held >= 0) & (distance >= 0) & (distance < window)
    return torch.where(visible, 0.0, float("-inf")).to(torch.float32)


def _no_mask(*args, **kwargs):
    # custom_sdpa masks causally itself; a mask tensor would be traced at a fixed size.
    return None


def register_attention() -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    _ensure_ops_loaded()
    ALL_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, et_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, _no_mask)
    return ATTENTION_NAME


def _update_cache(layer, key_states, value_states, *args, **kwargs):
    start_pos = layer.cumulative_length.item()
    seq_len = key_states.shape[-2]
    torch._check(start_pos >= 0)
    torch._check(start_pos + seq_len <= layer.max_cache_len)
    torch.ops.llama.update_cache(key_states.transpose(1, 2), layer.keys, start_pos)
    torch.ops.llama.update_cache(value_states.transpose(1, 2), layer.values, start_pos)
    return layer.keys, layer.values


def _ring_update(layer, key_states, value_states, *args, **kwargs):
    # Position p goes to slot p % size; the attention masks by window (ring_window_mask).
    start_pos = layer.cumulative_length.item()
    seq_len = key_states.shape[-2]
    torch._check(start_pos >= 0)
    size = layer.keys.shape[1]
    # ring_slots sized the ring for writes of at most a prefill chunk; a larger traced
    # bound fails export here.
    torch._check(seq_len <= layer.max_write)
    slots = ((start_pos + torch.arange(seq_len, dtype=torch.long)) % size).unsqueeze(0)
    torch.ops.llama.update_cache_with_indices(key_states.transpose(1, 2), layer.keys, start_pos, slots)
    torch.ops.llama.update_cache_with_indices(value_states.transpose(1, 2), layer.values, start_pos, slots)
    return layer.keys, layer.values


def _cache_layer(max_cache_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 window: int | None = None, max_write: int | None = None):
    """One layer's KV cache in BSHD layout, updated with llama::update_cache (linear)
    or llama::update_cache_with_indices (ring, for sliding-window layers)."""
    # transformers' Cache only counts layers deriving from its CacheLayerMixin family,
    # so the layer is a StaticLayer with its storage and update replaced.
    from transformers.cache_utils import StaticLayer

    class EtCacheLayer(StaticLayer):
        update = _update_cache if window is None else _ring_update

    layer = EtCacheLayer(max_cache_len=max_cache_len)
    shape = (1, max_cache_len, num_kv_heads, head_dim)
    layer.keys = torch.zeros(shape, dtype=dtype)
    layer.values = torch.zeros(shape, dtype=dtype)
    layer.dtype, layer.device = dtype, layer.keys.device
    layer.is_initialized = True
    layer.window, layer.max_write = window, max_write
    return layer


def ring_slots(window: int, max_cache_len: int, max_write: int) -> int:
    """Slots of a sliding layer's ring: a write of up to `max_write` tokens (the prefill
    chunk) must not evict positions that its own first query still sees, so window +
    max_write - 1; never more than the context, which a ring of that size never wraps."""
    return min(window + max_write - 1, max_cache_len)


def attention_implementation() -> str:
    return register_attention()


def install_cache(exportable, config, max_cache_len: int, prefill_chunk: int, dtype: torch.dtype, *,
                  sliding: frozenset = frozenset(), experts=None) -> None:
    """Swap the StaticCache layers of a transformers exportable for EtCacheLayer; the
    ``sliding`` layers get a ring of ``ring_slots`` entries instead of the context.
    (MoE experts stay the family's per-expert linears: these kernels have no gather.)"""
    _ensure_ops_loaded()
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    cache = exportable.static_cache
    for i in range(len(cache.layers)):
        if i in sliding:
            size = ring_slots(text.sliding_window, max_cache_len, prefill_chunk)
            layer = _cache_layer(size, text.num_key_value_heads, head_dim, dtype, text.sliding_window,
                                 prefill_chunk)
        else:
            layer = _cache_layer(max_cache_len, text.num_key_value_heads, head_dim, dtype)
        cache.layers[i] = layer
        # The wrapper registered the old tensors as buffers; point them at the new ones
        # so torch.export sees the mutated cache as program state.
        setattr(exportable, f"key_cache_{i}", layer.keys)
        setattr(exportable, f"value_cache_{i}", layer.values)
        setattr(exportable, f"cumulative_length_{i}", layer.cumulative_length)


class DecoderCache(torch.nn.Module):
    """Self-attention KV cache for a family's own decoder modules (Whisper's): ExecuTorch's
    LLM custom ops over a BSHD cache, as the text models of this flavour use."""

    def __init__(self, heads: int, head_dim: int, max_len: int, dtype):
        super().__init__()
        _ensure_ops_loaded()
        self.register_buffer("k", torch.zeros(1, max_len, heads, head_dim, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(1, max_len, heads, head_dim, dtype=dtype), persistent=False)

    def attend(self, q, k, v, start, positions):
        torch.ops.llama.update_cache(k.transpose(1, 2), self.k, start)
        torch.ops.llama.update_cache(v.transpose(1, 2), self.v, start)
        out = torch.ops.llama.custom_sdpa(q.transpose(1, 2), self.k, self.v, start, None, 0.0, True, 1.0)
        return out.transpose(1, 2)


def gated_delta_rule(q, k, v, decay, beta, state):
    """A gated delta net's recurrence (``mlxbuild.families.gated_delta``) as ExecuTorch's CPU
    kernel ``llama::gated_delta_rule``: q/k/v ``[B, T, H, D]`` in, ``[B, T, H, Dv]`` out;
    the kernel returns the new ``[B, H, Dk, Dv]`` state, written back into ``state``. Traced,
    so it loads nothing: ``attention_implementation()`` has loaded the ops."""
    heads_first = [x.transpose(1, 2).contiguous() for x in (q, k, v, decay, beta)]
    out, final = torch.ops.llama.gated_delta_rule(*heads_first, state)
    state.copy_(final)
    return out.transpose(1, 2)


def gated_delta_state(heads: int, k_dim: int, v_dim: int) -> tuple:
    return (1, heads, k_dim, v_dim)
