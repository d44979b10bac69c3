"""HF attention and KV cache that use ExecuTorch's own LLM custom ops.

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

ATTENTION_NAME = "mlxbuild_et_sdpa"


def _ensure_ops_loaded() -> None:
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  registers torch.ops.llama.*


def et_sdpa_forward(module, query, key, value, attention_mask, position_ids=None,
                    scaling=None, softcap=None, head_mask=None, **kwargs):
    # key/value arrive as the whole BSHD cache returned by EtCacheLayer.update.
    if softcap is not None or head_mask is not None or kwargs.get("dropout"):
        raise ValueError("ExecuTorch custom SDPA supports neither softcap, head_mask nor dropout")
    start_pos = position_ids[0][0].item()
    seq_len = query.shape[2]
    torch._check(start_pos >= 0)
    torch._check(start_pos + seq_len <= key.shape[1])
    q = query.transpose(1, 2)
    out = torch.ops.llama.custom_sdpa(q, key, value, start_pos, None, 0.0, True, scaling)
    return out, None


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


def _cache_layer(max_cache_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
    """One layer's KV cache in BSHD layout, updated with llama::update_cache."""
    # transformers' Cache only counts layers deriving from its CacheLayerMixin family,
    # so the layer is a StaticLayer with its storage and update replaced.
    from transformers.cache_utils import StaticLayer

    class EtCacheLayer(StaticLayer):
        update = _update_cache

    layer = EtCacheLayer(max_cache_len=max_cache_len)
    shape = (1, max_cache_len, num_kv_heads, head_dim)
    layer.keys = torch.zeros(shape, dtype=dtype)
    layer.values = torch.zeros(shape, dtype=dtype)
    layer.dtype, layer.device = dtype, layer.keys.device
    layer.is_initialized = True
    return layer


def install_cache(exportable, config, max_cache_len: int, dtype: torch.dtype) -> None:
    """Swap the StaticCache layers of a transformers exportable for EtCacheLayer."""
    _ensure_ops_loaded()
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    cache = exportable.static_cache
    for i in range(len(cache.layers)):
        layer = _cache_layer(max_cache_len, text.num_key_value_heads, head_dim, dtype)
        cache.layers[i] = layer
        # The wrapper registered the old tensors as buffers; point them at the new ones
        # so torch.export sees the mutated cache as program state.
        setattr(exportable, f"key_cache_{i}", layer.keys)
        setattr(exportable, f"value_cache_{i}", layer.values)
        setattr(exportable, f"cumulative_length_{i}", layer.cumulative_length)
