"""What a running step tells the user: sub-step notes with elapsed time on stderr,
and the third-party chatter that would bury them kept down.

doit shows a step's stderr at its default verbosity and hides it with
``-v 0``; ``-v 2`` also shows stdout. MLXBUILD_DEBUG=1 lets the libraries
speak again (warnings, INFO logs, progress bars).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

_state = {"label": "", "start": time.monotonic()}


def begin(kind: str, label: str) -> None:
    _state.update(label=f"{kind} {label}", start=time.monotonic())


def note(message: str) -> None:
    elapsed = time.monotonic() - _state["start"]
    print(f"   {_state['label']}: {message} [{elapsed:.1f} s]", file=sys.stderr, flush=True)


def quiet_libraries() -> None:
    if os.environ.get("MLXBUILD_DEBUG", "") not in ("", "0"):
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    # torchao warns about optional CUDA kernels; ExecuTorch's MLX logger prints INFO
    # summaries by default; torch warns about pytree registrations. None of it is ours.
    for name in ("torchao", "executorch", "executorch.backends.mlx", "torch", "root",
                 "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Some libraries set their loggers' levels when first imported, after this runs;
    # a global threshold holds regardless.
    logging.disable(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
