"""Reference outputs: the eager model, quantized by the same scheme, run the way an
artifact is run (for text generation: one prefill chunk, then single-token decode steps
through a static cache). Every target of the scheme is verified against these; the task
kind decides what is run and written (its arrays, and the ``ReferenceResult`` this stage
writes as ``reference.json``).
"""

from __future__ import annotations

from pathlib import Path

from mlxbuild import families
from mlxbuild.stages.quantize import quantized_model
from mlxbuild.steps import ReferenceParams, ReferenceResult


def run(params: ReferenceParams, cache, out: Path) -> ReferenceResult:
    plain = params.plain()
    if params.tokenizer:
        plain["tokenizer_dir"] = str(cache.read("tokenizer", params.tokenizer))
    info = families.get(params.task).reference(quantized_model(cache, params), plain, out)
    result = ReferenceResult(**info)
    result.write(out)
    return result
