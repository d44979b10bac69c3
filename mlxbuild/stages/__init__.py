"""The build's stages. Each has ``run(params, cache, out)`` that reads upstream cache
entries named in ``params`` and writes its outputs into ``out`` (a scratch
directory that becomes the step's cache entry only if ``run`` returns).

Stages import torch; nothing on the planning path imports this package.
"""

from __future__ import annotations

import importlib

KINDS = ("weights", "quantize", "export", "reference", "lower", "verify")


def stage(kind: str):
    if kind not in KINDS:
        raise ValueError(f"unknown stage {kind!r}")
    return importlib.import_module(f"mlxbuild.stages.{kind}")
