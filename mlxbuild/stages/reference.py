"""Reference outputs: the eager model, quantized by the same scheme, run the way an
artifact is run (for text generation: one prefill chunk, then single-token decode steps
through a static cache). Every target of the scheme is verified against these; the task
kind decides what is run and written.
"""

from __future__ import annotations

from pathlib import Path

from mlxbuild import families
from mlxbuild.stages.quantize import quantized_model


def run(params: dict, cache, out: Path) -> dict:
    return families.get(params.get("task")).reference(quantized_model(cache, params), params, out)
