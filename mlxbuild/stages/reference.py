"""Reference outputs: the eager model, quantized by the same scheme, run the way an
artifact is run (for text generation: one prefill chunk, then single-token decode steps
through a static cache). Every target of the scheme is verified against these; the task
kind decides what is run and written.
"""

from __future__ import annotations

from pathlib import Path

from mlxbuild import task_kinds
from mlxbuild.task_kinds.text_generation import prompt_tokens  # noqa: F401  (kept importable here)


def run(params: dict, cache, out: Path) -> dict:
    return task_kinds.get(params.get("task")).reference(params, cache, out)
