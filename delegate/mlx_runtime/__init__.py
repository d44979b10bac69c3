"""Run MLX-delegated .pte files on any host through the `mlx` package.

ExecuTorch's own runtime has an MLXBackend only on Apple silicon; this package
runs the same programs anywhere ``mlx.core`` runs (Linux CPU included)::

    from delegate import mlx_runtime

    prog = mlx_runtime.load("qwen3-tiny-mlx-4w.pte")
    prog.method_names                  # ['forward']
    prog.constant_methods              # {'get_max_seq_len': 128, ...}
    logits, = prog.forward(tokens, positions)   # numpy in -> numpy out; torch in -> torch out

Layers: ``fb`` (payload bindings and reader), ``graph`` (the MLX payload
interpreter), ``program`` (the .pte loader and executor), ``nodes`` (node handlers,
registered through ``registry``).
"""

from __future__ import annotations

import os
from typing import Iterable

from .program import Method, Program, ProgramError

__all__ = ["load", "generate", "Program", "Method", "ProgramError"]


def load(path: str | os.PathLike, data_files: Iterable[str | os.PathLike] = (), *,
         precision: str = "auto") -> Program:
    """Load a ``.pte`` (and its ``.ptd`` files: ``data_files``, else the ones beside it).

    ``precision``: ``"native"`` computes in the dtypes the MLX graph declares;
    ``"float32"`` runs fp16/bf16 arithmetic in float32 (outputs keep their declared
    dtype); ``"auto"`` (default) is ``"float32"`` when mlx runs on the CPU, whose
    half-precision kernels accumulate in half precision (see ``graph._promotes``).
    """
    return Program(path, data_files, precision=precision)


def generate(program: Program, prompt: "Iterable[int]", max_new_tokens: int = 32, *, method: str = "forward",
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
    eos_ids = meta.get("get_eos_ids") if stop_at_eos else None
    eos = {int(eos_ids)} if isinstance(eos_ids, int) else {int(e) for e in (eos_ids or [])}
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
    out, pos, stopped = [], len(ids), "max_new_tokens"
    while len(out) < max_new_tokens:
        nxt = int(np.asarray(logits)[0, -1].argmax())
        out.append(nxt)
        if nxt in eos:
            stopped = "eos"
            break
        if pos >= limit:
            stopped = "context"
            break
        if len(out) == max_new_tokens:
            break
        logits = program.run(method, [np.array([[nxt]], dtype=np.int64), np.array([pos], dtype=np.int64)])[0]
        pos += 1
    t2 = time.perf_counter()
    decoded = max(len(out) - 1, 0)  # the first new token comes from the prefill's logits
    return {"prompt": ids, "tokens": out, "stopped": stopped,
            "prefill_s": t1 - t0, "decode_s": t2 - t1,
            "prefill_tokens_per_s": len(ids) / (t1 - t0) if t1 > t0 else None,
            "decode_tokens_per_s": decoded / (t2 - t1) if decoded and t2 > t1 else None}
