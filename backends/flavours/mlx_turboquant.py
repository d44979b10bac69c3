"""The ``mlx-tq4`` export flavour: the ``mlx`` flavour with ExecuTorch's TurboQuant KV
cache (``executorch.backends.mlx.llm.turboquant_cache``) on every full-attention layer.

Keys and values are stored rotated (a fixed random orthogonal matrix), as 4-bit indices
into a 16-entry Lloyd-Max codebook, nibble-packed, plus one bf16 norm per vector: a
head_dim-128 cache takes 0.26x the bytes of a bf16 one. Attention runs in the rotated
space (the query rotated in, the output rotated back). The compression and dequantization
are ExecuTorch's custom Metal kernels (``tq_norm``, ``tq4_compress``, ``tq_dequant``),
which our runtime recognises and computes with mlx ops off Apple GPUs
(``mlx_runtime.kernels``), so these artifacts are verified here too.

What an MLX target selects with ``options: {kv_cache: turboquant}`` (``backends.mlx``).
Sliding-window layers keep their ring; ExecuTorch's kernels need ``head_dim`` a multiple
of 64 and a bf16 model.
"""

from __future__ import annotations

import torch

from backends.flavours import mlx as _mlx
from backends.flavours.mlx import DecoderCache, gated_delta_rule, gated_delta_state  # noqa: F401

NAME = "mlx-tq4"
ATTENTION_NAME = "mlxbuild_mlx_tq4"
SEED = 42  # ExecuTorch's default rotation seed


def import_turboquant() -> None:
    """Import ExecuTorch's TurboQuant cache (registering its ops and their Metal lowerings).
    It lives under ``executorch.extension.llm.modules``, whose package ``__init__`` imports
    torchtune for attention modules the cache does not use, and ExecuTorch does not depend
    on torchtune: where it is missing, the package is entered without its ``__init__``."""
    import importlib
    import importlib.util
    import sys
    import types

    package = "executorch.extension.llm.modules"
    if package not in sys.modules:
        try:
            importlib.import_module(package)
        except ModuleNotFoundError as e:
            if e.name != "torchtune":
                raise
            spec = importlib.util.find_spec(package)
            stand_in = types.ModuleType(package)
            stand_in.__path__ = list(spec.submodule_search_locations)
            sys.modules[package] = stand_in
    import executorch.backends.mlx.llm.turboquant_cache  # noqa: F401


def attention_implementation() -> str:
    _mlx.attention_implementation()  # the mlx ops, the gated delta op
    import_turboquant()
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from executorch.backends.mlx.llm.hf_attention import sdpa_mask_passthrough

    # Registered once with a stand-in; install_cache points it at the exportable's caches.
    ALL_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, _unbound)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask_passthrough)
    return ATTENTION_NAME


def _unbound(*args, **kwargs):
    raise RuntimeError("the TurboQuant attention runs only on an exportable its cache was installed on")


class _Layer(torch.nn.Module):
    """One layer's TurboQuant cache behind HFStaticCache's per-layer ``update``: it writes the
    compressed keys and values and hands the step's own back (attention reads the cache)."""

    def __init__(self, tq):
        super().__init__()
        self.tq = tq

    def update(self, input_pos, k_val, v_val):
        self.tq.update(input_pos, k_val, v_val)
        return k_val, v_val


def install_cache(exportable, config, max_cache_len: int, prefill_chunk: int, dtype, *,
                  sliding: frozenset = frozenset(), experts=None) -> None:
    import_turboquant()
    from executorch.backends.mlx.llm.turboquant_cache import TurboQuantKVCache
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from backends.errors import BackendError

    _mlx.install_cache(exportable, config, max_cache_len, prefill_chunk, dtype, sliding=sliding, experts=experts)
    if dtype != torch.bfloat16:
        raise BackendError(f"kv_cache turboquant: ExecuTorch's TurboQuant cache is bf16 (its rotation, "
                           f"boundaries and norms); this target is {str(dtype).removeprefix('torch.')}")
    cache = exportable.static_cache
    layers = {}
    for i, layer in enumerate(cache.kv_cache):
        if i in sliding:
            continue
        if layer.head_dim % 64:
            raise BackendError(f"kv_cache turboquant: head_dim {layer.head_dim} is not a multiple of 64, "
                               "which ExecuTorch's TurboQuant Metal kernels need")
        tq = TurboQuantKVCache(max_batch_size=1, max_context_length=max_cache_len, n_heads=layer.n_heads,
                               head_dim=layer.head_dim, enable_dynamic_shape=True, dtype=dtype, seed=SEED)
        cache.kv_cache[i] = layers[i] = _Layer(tq)
        # the wrapper registered the static buffers as program state: now the compressed ones
        for name in ("key_cache", "value_cache"):
            if hasattr(exportable, f"{name}_{i}"):
                delattr(exportable, f"{name}_{i}")
    # HFStaticCache is no module: the layers join the exportable's tree, so their buffers are
    # program state (the compressed cache mutated in place) rather than constants.
    exportable.turboquant = torch.nn.ModuleDict({str(i): layer for i, layer in layers.items()})
    current = exportable.model.config._attn_implementation  # the sliding layers' own, if any
    attend = _attention(layers, ALL_ATTENTION_FUNCTIONS["mlx" if current == ATTENTION_NAME else current])
    ALL_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, attend)
    exportable.model.config._attn_implementation = ATTENTION_NAME


def _attention(layers: dict, fallback):
    """Attention over a layer's TurboQuant cache (ExecuTorch's ``sdpa``: query rotated in,
    custom SDPA over the dequantized rotated cache, output rotated back); other layers (a
    sliding window's ring) go to the attention they had."""

    def attend(module, query, key, value, attention_mask, position_ids=None, scaling=None,
               softcap=None, head_mask=None, **kwargs):
        layer = layers.get(getattr(module, "layer_idx", None))
        if layer is None:
            return fallback(module, query, key, value, attention_mask, position_ids=position_ids,
                            scaling=scaling, softcap=softcap, head_mask=head_mask, **kwargs)
        if softcap is not None or head_mask is not None or kwargs.get("dropout"):
            raise ValueError("TurboQuant attention supports neither softcap, head_mask nor dropout")
        start_pos = position_ids[0][0].item()
        torch._check(start_pos >= 0)
        out = layer.tq.sdpa(query, start_pos, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    return attend

