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

__all__ = ["load", "Program", "Method", "ProgramError"]


def load(path: str | os.PathLike, data_files: Iterable[str | os.PathLike] = ()) -> Program:
    """Load a ``.pte`` (and its ``.ptd`` files: ``data_files``, else the ones beside it)."""
    return Program(path, data_files)
