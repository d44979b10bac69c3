"""Export flavours: the source transforms applied to a family's model before
torch.export, so attention and KV-cache updates become ops a backend's runtime
understands. Several backends lower from one flavour (XNNPACK and Vulkan from
``et-llm-ops``; portable, CoreML and CUDA from ``plain``), and so share one export.

A flavour module provides ``NAME``, ``attention_implementation()`` (registers its ops;
the transformers attention name to load a model with, or None),
``install_cache(exportable, config, max_cache_len, prefill_chunk, dtype, *, sliding,
experts)`` for a transformers exportable, and ``DecoderCache(heads, head_dim, max_len,
dtype)`` for a family's own decoder modules. Flavours import torch; the planner only
reads their names.
"""

from __future__ import annotations

# flavour name -> module under backends.flavours
MODULES = {"mlx": "mlx", "mlx-tq4": "mlx_turboquant", "et-llm-ops": "et_llm_ops", "plain": "plain"}
