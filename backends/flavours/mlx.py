"""The ``mlx`` export flavour: the MLX delegate's attention (``mlx::custom_sdpa``), KV cache
(``mlx::kv_cache_update``, a ring for sliding-window layers) and MoE gather
(``mlx::gather_qmm``), installed on a family's exportable before torch.export so
they lower into the delegate. What the MLX backend lowers from (``backends.mlx``).
"""

from __future__ import annotations

import torch

NAME = "mlx"


def _ready() -> None:
    from backends.mlx_schema import ensure_mlx_schema

    ensure_mlx_schema()


def attention_implementation() -> str | None:
    _ready()
    from executorch.backends.mlx.llm.hf_attention import register_mlx_attention

    register_mlx_attention("mlx")
    # the gated delta recurrence's op and its lowering pattern (mlxbuild.families.gated_delta),
    # which a saved program that uses it needs before it loads
    import executorch.backends.mlx.custom_kernel_ops.gated_delta_rule  # noqa: F401
    return "mlx"


SLIDING_ATTENTION = "mlxbuild_mlx_sliding"


def install_cache(exportable, config, max_cache_len: int, prefill_chunk: int, dtype, *,
                  sliding: frozenset = frozenset(), experts=None) -> None:
    """The MLX flavour's source transforms on a transformers exportable: MoE experts
    onto gather_(q)mm, the KV cache onto mlx::kv_cache_update (a ring of window +
    chunk - 1 slots for sliding-window layers), and the sliding layers' attention
    onto the ring's window mask."""
    _ready()
    from executorch.backends.mlx.llm.exportable import install_mlx_cache

    if experts is not None:
        gather_experts(exportable.model, experts)
    window = getattr(config.get_text_config(), "sliding_window", None) if sliding else None
    # ExecuTorch sizes a sliding layer's ring as window + chunk - 1 but refuses a chunk
    # above the window; TextLLMRunner's contract is a whole-context chunk (docs/runners.md).
    install_mlx_cache(exportable, config=config, max_batch_size=1, max_cache_len=max_cache_len,
                      dtype=dtype, prefill_chunk_size=min(prefill_chunk, window) if window else prefill_chunk)
    if window and prefill_chunk > window:
        _widen_rings(exportable, prefill_chunk, max_cache_len)
    _positions_from_cache_position(exportable.static_cache)
    _accept_call_kwargs(exportable.static_cache)
    if sliding:
        _use_sliding_attention(exportable)


def _widen_rings(exportable, max_write: int, max_cache_len: int) -> None:
    """Give each ring layer room for a write of ``max_write`` tokens: window + max_write - 1
    slots (what a ring needs so a write never evicts a position its first query still
    sees), at most the context, where the ring never wraps. The ring's update and window
    mask are written for any buffer size; only ExecuTorch's constructor caps the write."""
    import types

    from executorch.backends.mlx.llm.cache import RingBufferKVCache

    cache = exportable.static_cache
    for i, layer in enumerate(cache.kv_cache):
        if not isinstance(layer, RingBufferKVCache):
            continue
        size = min(layer.window_size + max_write - 1, max_cache_len)
        layer.max_write_len, layer.buffer_size = max_write, size
        shape = (layer.max_batch_size, layer.n_heads, size, layer.head_dim)
        layer.k_cache = torch.zeros(shape, dtype=layer.k_cache.dtype)
        layer.v_cache = torch.zeros(shape, dtype=layer.v_cache.dtype)
        # The wrapper registered the old tensors as program state; point it at the new ones.
        setattr(exportable, f"key_cache_{i}", layer.k_cache)
        setattr(exportable, f"value_cache_{i}", layer.v_cache)
        # transformers still asks its own sliding layer for mask sizes, which branches on
        # the chunk against the window (a guard seq_len <= window at trace time); the
        # ring's own window mask is what attention uses, so answer statically.
        hf_layer = cache.layers[i]
        hf_layer.get_mask_sizes = types.MethodType(lambda self, *args, _n=size, **kwargs: (_n, 0), hf_layer)


def _positions_from_cache_position(cache) -> None:
    """transformers derives position ids from ``cache.get_seq_length()``. ExecuTorch's
    HFStaticCache answers by counting the non-zero slots of layer 0's buffer, which
    saturates once a ring buffer (a sliding layer) is full: every later token would get
    the same position. Answer with the position the wrapper writes into each layer
    before every call (cache_position[0]), as transformers' own StaticLayer does."""
    import types

    def get_seq_length(self, layer_idx: int = 0):
        return self.layers[layer_idx].cumulative_length

    cache.get_seq_length = types.MethodType(get_seq_length, cache)


def _accept_call_kwargs(cache) -> None:
    """transformers 5.24 calls ``cache.update(k, v, layer_idx, kwargs=kwargs)``, handing the
    attention call's extra arguments down to the cache layers; ExecuTorch 1.5.1's
    HFStaticCache.update takes only ``cache_kwargs`` and fails to bind. Its layers need
    none of them (the write position is each layer's cumulative_length, which the wrapper
    sets before every call; 5.23 passed nothing), so they are dropped."""
    import types

    update = type(cache).update

    def update_any(self, key_states, value_states, layer_idx, cache_kwargs=None, **_call_kwargs):
        return update(self, key_states, value_states, layer_idx, cache_kwargs)

    cache.update = types.MethodType(update_any, cache)


def _use_sliding_attention(exportable) -> None:
    from types import SimpleNamespace

    from executorch.backends.mlx.llm.hf_attention import (
        get_mlx_sliding_window_sdpa,
        sdpa_mask_passthrough,
    )
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    # ExecuTorch's sliding SDPA finds each layer's ring through `.cache`; our wrapper
    # keeps it in `.static_cache`, so hand it a view. Full-attention layers fall
    # through to the regular mlx::custom_sdpa path.
    attend = get_mlx_sliding_window_sdpa(SimpleNamespace(cache=exportable.static_cache))
    ALL_ATTENTION_FUNCTIONS.register(SLIDING_ATTENTION, attend)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SLIDING_ATTENTION, sdpa_mask_passthrough)
    exportable.model.config._attn_implementation = SLIDING_ATTENTION


def gather_experts(model, experts_type) -> int:
    """Replace each ``experts_type`` module (the family's per-expert linears, with
    ``num_experts``, ``hidden``, ``intermediate``, ``act_fn`` and ``gate_proj``/``up_proj``/
    ``down_proj`` lists; ``mlxbuild.families.moe.ExpertLinears``) by ExecuTorch's SwitchMLP over the same
    (already quantized) per-expert linears, packed into [E, out, in] stacks, so routing
    lowers to mlx::gather_qmm (quantized) / mlx::gather_mm and computes only the chosen
    experts. Returns how many blocks were replaced."""
    from executorch.backends.mlx.llm.switch import SwitchMLP

    from backends.errors import BackendError

    class GatherExperts(torch.nn.Module):
        def __init__(self, mlp):
            super().__init__()
            self.mlp = mlp

        def forward(self, hidden_states, top_k_index, top_k_weights):
            top_k = top_k_index.shape[-1]
            return self.mlp(hidden_states, top_k_weights.to(hidden_states.dtype), top_k_index, top_k)

    names = [n for n, m in model.named_modules() if isinstance(m, experts_type)]
    for name in names:
        experts = model.get_submodule(name)
        with torch.device("meta"):  # SwitchLinear builds throwaway experts; ours replace them
            mlp = SwitchMLP(experts.hidden, experts.intermediate, experts.num_experts,
                            activation=experts.act_fn)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            switch = getattr(mlp, proj)
            switch.experts = getattr(experts, proj)
            try:
                switch.pack()
            except TypeError as e:
                raise BackendError(f"{name}.{proj}: MoE experts cannot use MLX gather_qmm: {e}; "
                                 "use an affine weight-only scheme for MLX targets") from None
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, GatherExperts(mlp))
    return len(names)


class DecoderCache(torch.nn.Module):
    """Self-attention KV cache for a family's own decoder modules (Whisper's): the MLX
    delegate's cache update and cache-aware SDPA (BHSD)."""

    def __init__(self, heads: int, head_dim: int, max_len: int, dtype):
        super().__init__()
        _ready()
        from executorch.backends.mlx.llm.cache import KVCache

        self.cache = KVCache(max_batch_size=1, max_context_length=max_len, n_heads=heads,
                             head_dim=head_dim, enable_dynamic_shape=True, dtype=dtype)

    def attend(self, q, k, v, start, positions):
        keys, values = self.cache.update(start, k, v)
        return torch.ops.mlx.custom_sdpa(q, keys, values, start_pos=start, is_causal=True, scale=1.0)


def gated_delta_rule(q, k, v, decay, beta, state):
    """A gated delta net's recurrence (``mlxbuild.families.gated_delta``) as the MLX
    delegate's ``mlx::gated_delta_rule`` over a ``[B, H, Dv, Dk]`` state it mutates, lowered
    as ExecuTorch's fused Metal kernel (``gated_delta_step``: one kernel per call, which our
    runtime computes with mlx ops off Apple GPUs, ``mlx_runtime.kernels``); where the key
    head size is not a multiple of the kernel's 32-wide SIMD groups, as a Scan of mlx ops.
    Traced, so it registers nothing: ``attention_implementation()`` has registered the op."""
    return torch.ops.mlx.gated_delta_rule(q, k, v, decay, beta, state, use_custom_kernel=q.shape[-1] % 32 == 0)


def gated_delta_state(heads: int, k_dim: int, v_dim: int) -> tuple:
    return (1, heads, v_dim, k_dim)
