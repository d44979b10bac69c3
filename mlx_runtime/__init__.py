"""Run MLX-delegated .pte files on any host through the `mlx` package.

ExecuTorch's own runtime has an MLXBackend only on Apple silicon; this package
runs the same programs anywhere ``mlx.core`` runs (Linux CPU included)::

    import mlx_runtime

    prog = mlx_runtime.load("qwen3-tiny-mlx-4w.pte")
    prog.method_names                  # ['forward']
    prog.constant_methods              # {'get_max_seq_len': 128, ...}
    logits, = prog.forward(tokens, positions)   # numpy in -> numpy out; torch in -> torch out

It stands alone: it imports nothing of mlxbuild, so an app or a test harness can use
it with only executorch and mlx installed. The greedy loops that drive a program live
with the model families (``mlxbuild.families.decoding``): they run on either runtime.

Layers: ``pte`` (the .pte container reader), ``generated`` (flatc-generated files, made
once), ``fb`` (payload bindings and reader), ``graph`` (the MLX payload
interpreter), ``program`` (the .pte loader and executor), ``nodes`` (node handlers,
registered through ``registry``).
"""

from __future__ import annotations

import os
from typing import Iterable

from .program import Method, Program, ProgramError

__all__ = ["load", "Program", "Method", "ProgramError"]


def load(path: str | os.PathLike, data_files: Iterable[str | os.PathLike] = (), *,
         precision: str = "auto") -> Program:
    """Load a ``.pte`` (and its ``.ptd`` files: ``data_files``, else the ones beside it).

    ``precision``: ``"native"`` computes in the dtypes the MLX graph declares;
    ``"float32"`` runs fp16/bf16 arithmetic in float32 (outputs keep their declared
    dtype); ``"auto"`` (default) is ``"float32"`` when mlx runs on the CPU, whose
    half-precision kernels accumulate in half precision (see ``graph._promotes``).
    """
    return Program(path, data_files, precision=precision)
