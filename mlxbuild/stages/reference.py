"""Reference outputs: the eager model, quantized by the same scheme, run the way an
artifact is run (for text generation: one prefill chunk, then single-token decode steps
through a static cache). Every target of the scheme is verified against these; the task
kind decides what is run and written (its arrays, and the ``ReferenceResult`` this stage
writes as ``reference.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mlxbuild import families
from mlxbuild.families import hf, text_runner
from mlxbuild.quantize import device_for
from mlxbuild.stages.quantize import quantized_model
from mlxbuild.steps import ReferenceParams, ReferenceResult


def round_dynamic_int4_scales(model: torch.nn.Module, dtype: str) -> int:
    """Round, in place, the scales of the 4-bit weights that run under int8 dynamic
    activations to ``dtype`` (kept in their own dtype), as a backend that stores them so
    computes with them (its ``REFERENCE_SCALES``). Returns how many weights were rounded."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    to = hf.DTYPES[dtype]
    n = 0
    for p in model.parameters():
        if isinstance(p, IntxUnpackedToInt8Tensor) and p.activation_quantization \
                and p.target_dtype == torch.int4:
            p.scale.copy_(p.scale.to(to).to(p.scale.dtype))
            n += 1
    return n


def run(params: ReferenceParams, cache, out: Path) -> ReferenceResult:
    plain = params.plain()
    if params.tokenizer:
        plain["tokenizer_dir"] = str(cache.read("tokenizer", params.tokenizer))
    model = quantized_model(cache, params)
    if params.scales:
        round_dynamic_int4_scales(model, params.scales)
    kind = families.get(params.task)
    with device_for(model):
        info = kind.reference(model, plain, out)
        if params.tokenizer and params.runner_prompt and hasattr(kind, "runner_reference"):
            # a kind whose runner is not TextLLMRunner (the multimodal runner) says its own
            info["runner"] = kind.runner_reference(model, plain, Path(plain["tokenizer_dir"]), out)
        elif params.tokenizer and params.runner_prompt and text_runner.applies(model):
            runner = text_runner.runner_reference(model, plain, Path(plain["tokenizer_dir"]))
            (out / text_runner.RUNNER_FILE).write_text(json.dumps(runner))
            info["runner"] = {k: runner[k] for k in ("prompt_tokens", "new_tokens")}
    result = ReferenceResult(**info)
    result.write(out)
    return result
