"""Greedy loops over a loaded program, whichever runtime loaded it (our MLX runtime or
ExecuTorch's, behind the same ``run(method, inputs)`` / ``reset`` / ``constant_methods``
interface): what ``mlxbuild run`` and the speech families' transcription use.
"""

from __future__ import annotations

from typing import Iterable


def eos_set(constant_methods: dict) -> set[int]:
    """The ids of ``get_eos_ids`` (a list or a single id) as a set."""
    ids = constant_methods.get("get_eos_ids")
    return {int(ids)} if isinstance(ids, int) else {int(e) for e in (ids or [])}


def greedy_continue(logits, step, pos: int, max_new_tokens: int, eos: set[int], limit: int):
    """Greedy tokens from the last row of `logits` on: ``step(token, pos) -> logits`` feeds one
    token at a time. Stops at an `eos` token, `max_new_tokens`, or position `limit`; returns
    ``(tokens, why)``. Shared by every task kind's loop (text, transcription), whatever the
    runtime: numpy or torch logits."""
    import numpy as np

    out = []
    while len(out) < max_new_tokens:
        last = logits[0, -1]
        nxt = int(np.asarray(last.float() if hasattr(last, "float") else last).argmax())
        out.append(nxt)
        if nxt in eos:
            return out, "eos"
        if pos >= limit:
            return out, "context"
        if len(out) == max_new_tokens:
            break
        logits = step(nxt, pos)
        pos += 1
    return out, "max_new_tokens"


def generate(program, prompt: "Iterable[int]", max_new_tokens: int = 32, *, method: str = "forward",
             stop_at_eos: bool = True) -> dict:
    """Greedy decoding with an LLM artifact (``forward(input_ids[1, T], cache_position[T])
    -> logits[1, T, V]`` with a KV cache): the prompt is prefilled in chunks of
    ``get_prefill_chunk_size``, then one token per call until ``max_new_tokens``, an
    ``get_eos_ids`` token, or ``get_max_context_len``. The program's state is reset first.

    Returns ``{"prompt", "tokens" (generated ids), "prefill_s", "decode_s",
    "prefill_tokens_per_s", "decode_tokens_per_s", "stopped"}``.
    """
    import time

    import numpy as np

    meta = program.constant_methods
    ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("generate: empty prompt")
    chunk = int(meta.get("get_prefill_chunk_size") or meta.get("get_max_seq_len") or len(ids))
    limit = int(meta.get("get_max_context_len") or meta.get("get_max_seq_len") or len(ids) + max_new_tokens)
    eos = eos_set(meta) if stop_at_eos else set()
    if len(ids) > limit:
        raise ValueError(f"generate: {len(ids)} prompt tokens exceed the context length {limit}")
    program.reset(method)
    program.method(method)  # load (constants, init chain) outside the timings
    t0 = time.perf_counter()
    logits = None
    for start in range(0, len(ids), chunk):
        part = np.array([ids[start:start + chunk]], dtype=np.int64)
        logits = program.run(method, [part, np.arange(start, start + part.shape[1], dtype=np.int64)])[0]
    t1 = time.perf_counter()
    out, stopped = greedy_continue(
        logits, lambda token, pos: program.run(method, [np.array([[token]], dtype=np.int64),
                                                        np.array([pos], dtype=np.int64)])[0],
        len(ids), max_new_tokens, eos, limit)
    t2 = time.perf_counter()
    decoded = max(len(out) - 1, 0)  # the first new token comes from the prefill's logits
    return {"prompt": ids, "tokens": out, "stopped": stopped,
            "prefill_s": t1 - t0, "decode_s": t2 - t1,
            "prefill_tokens_per_s": len(ids) / (t1 - t0) if t1 > t0 else None,
            "decode_tokens_per_s": decoded / (t2 - t1) if decoded and t2 > t1 else None}
