"""The build's stages, one module per ``StepKind`` (``mlxbuild.steps``). Each has
``run(params, cache, out)``: it reads the upstream cache entries its typed params name
and writes its outputs into ``out`` (a scratch directory that becomes the step's cache
entry only if ``run`` returns). The package step publishes instead
(``mlxbuild.artifacts``).

The stages are the one place where a model family meets a backend. They import torch;
nothing on the planning path imports this package's modules.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mlxbuild.steps import StepKind

CACHED = (StepKind.WEIGHTS, StepKind.TOKENIZER, StepKind.PREPROCESSOR, StepKind.QUANTIZE, StepKind.EXPORT, StepKind.REFERENCE, StepKind.LOWER,
          StepKind.VERIFY, StepKind.BASELINE, StepKind.QUALITY)


def stage(kind: StepKind | str) -> ModuleType:
    kind = StepKind(kind)
    if kind not in CACHED:
        raise ValueError(f"{kind} is not a cached stage")
    return importlib.import_module(f"mlxbuild.stages.{kind.value}")
