"""What the model families need checked before a build, without torch or transformers.

Only synthetic sources carry their config in the manifest; for hub and local
checkpoints the same rule is enforced at export time against the real config
(``mlxbuild.families.hf.check_prefill_chunk``).
"""

from __future__ import annotations

# transformers' default sliding window of the architectures that have sliding layers.
DEFAULT_SLIDING_WINDOW = {"gemma3": 4096}


def synthetic_sliding_window(architecture: str, config: dict) -> int | None:
    """The sliding window of a synthetic model, or None when no layer slides."""
    if architecture not in DEFAULT_SLIDING_WINDOW:
        return None
    window = config.get("sliding_window", DEFAULT_SLIDING_WINDOW[architecture])
    layer_types = config.get("layer_types")
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


def prefill_chunk_problem(window: int | None, max_prefill_chunk: int) -> str | None:
    """Why a prefill chunk does not fit the sliding layers' ring cache (None when it does)."""
    if window is None or max_prefill_chunk <= window:
        return None
    return (f"{max_prefill_chunk} exceeds the model's sliding window ({window}): the sliding "
            f"layers' KV cache is a ring bounded by the window, so one step may write at most "
            f"{window} tokens; set max_prefill_chunk <= {window}")


def runner_contract_problem(max_prefill_chunk: int, max_context_length: int) -> str | None:
    """Why a model without sliding layers breaks ExecuTorch's TextLLMRunner (None when not):
    it prefills in chunks of get_max_seq_len (our max_prefill_chunk) and takes a chunk below
    get_max_context_len for a ring-buffer model, budgeting generation past a static cache."""
    if max_prefill_chunk >= max_context_length:
        return None
    return (f"{max_prefill_chunk} is below max_context_length ({max_context_length}): "
            "ExecuTorch's TextLLMRunner prefills in chunks of get_max_seq_len and takes "
            "get_max_seq_len < get_max_context_len for a ring-buffer model, so it would "
            "generate past this model's KV cache; leave max_prefill_chunk unset (it "
            "defaults to max_context_length)")
