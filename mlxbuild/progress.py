"""What a running step tells the user: sub-step notes with elapsed time on stderr,
and the third-party chatter that would bury them kept down.

doit shows a step's stderr at its default verbosity and hides it with
``-v 0``; ``-v 2`` also shows stdout. MLXBUILD_DEBUG=1 lets the libraries
speak again (warnings, INFO logs, progress bars).

Two ways to show it. *Plain* (not a terminal, ``--plain``, ``MLXBUILD_PLAIN=1``
or ``TERM=dumb``): every note is its own line, no carriage returns, no colour,
so CI logs read top to bottom. *Live* (a terminal): a note replaces the line
it is on, and the build's reporter keeps one status line with the running
steps' elapsed time (a note from a step running in this process joins it).
Colour is used only when live and ``NO_COLOR`` is unset.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

_state = {"label": "", "start": time.monotonic()}
# The live status line of the reporter in this process, if it shows one.
_listener = {"pid": None, "fn": None}

CLEAR_LINE = "\r\x1b[K"


def is_live(stream) -> bool:
    """Whether `stream` gets live (one updating line) output rather than plain lines."""
    if os.environ.get("MLXBUILD_PLAIN", "") not in ("", "0") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def use_colour(stream) -> bool:
    return is_live(stream) and not os.environ.get("NO_COLOR")  # no-color.org: any non-empty value


def listen(fn) -> None:
    """Route this process's notes to `fn(text)` (the reporter's status line); None stops."""
    _listener.update(pid=os.getpid() if fn else None, fn=fn)


def begin(kind: str, label: str) -> None:
    _state.update(label=f"{kind} {label}", start=time.monotonic())


def note(message: str) -> None:
    elapsed = time.monotonic() - _state["start"]
    text = f"   {_state['label']}: {message} [{elapsed:.1f} s]"
    stream = sys.stderr  # doit swaps it for a buffer at -v 0; then it is not live
    if not is_live(stream):
        print(text, file=stream, flush=True)
    elif _listener["fn"] is not None and _listener["pid"] == os.getpid():
        _listener["fn"](f"{message} [{elapsed:.1f} s]")  # the status line names the step
    else:  # a worker process (-n N): overwrite the line; the reporter redraws its own after
        stream.write(CLEAR_LINE + text)
        stream.flush()


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
