"""What the text families need checked before a build, without torch or transformers:
the contract of ExecuTorch's TextLLMRunner on the prefill chunk (docs/runners.md). The
manifest checks it; ``mlxbuild.families.hf.check_prefill_chunk`` checks it again at export,
against what was loaded.
"""

from __future__ import annotations


def runner_contract_problem(max_prefill_chunk: int, max_context_length: int) -> str | None:
    """Why a text model's chunk breaks ExecuTorch's TextLLMRunner (None when it does not):
    it prefills in chunks of get_max_seq_len (our max_prefill_chunk) and takes a chunk below
    get_max_context_len for a ring-buffer model, budgeting generation past a static cache."""
    if max_prefill_chunk >= max_context_length:
        return None
    return (f"{max_prefill_chunk} is below max_context_length ({max_context_length}): "
            "ExecuTorch's TextLLMRunner prefills in chunks of get_max_seq_len and takes "
            "get_max_seq_len < get_max_context_len for a ring-buffer model, so it would "
            "generate past this model's KV cache; leave max_prefill_chunk unset (it "
            "defaults to max_context_length)")
