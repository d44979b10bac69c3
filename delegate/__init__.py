"""Backend-specific knowledge: one module per ExecuTorch backend.

Each backend module is importable without torch (the planner reads its
constants); everything that needs torch or executorch is imported inside the
functions. A backend module provides:

- ``FLAVOUR``: which export variant it lowers from (the source transforms applied
  before torch.export: attention and KV-cache ops its runtime understands);
- ``VERIFY``: ``"runtime"`` when the build host can execute its programs, or
  ``"structural"`` when it can only inspect them; optionally ``load_method(pte)`` when
  its programs run on a runtime of ours rather than ExecuTorch's, and
  ``check_structure(info, methods)`` for what must hold of a lowered program beyond its
  numbers (the whole check for structural backends: ``delegate.structural``);
- ``prepare(model)`` / ``install_cache(exportable, config, max_cache_len, chunk, dtype)``:
  the flavour's source transforms;
- ``lower(programs, options, constant_methods)``: ``(edge, program manager)``; ``options``
  are the target's, validated by the backend's model in ``capabilities.py``;
- optionally ``preflight()``: raise ``mlxbuild.errors.BuildError`` when this host cannot
  lower for the backend at all (checked once per build, before any step runs).
"""

from __future__ import annotations

import importlib
from types import ModuleType

BACKENDS = ("mlx", "xnnpack", "portable", "coreml", "vulkan", "cuda")


def backend(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not supported yet (supported: {', '.join(BACKENDS)})")
    return importlib.import_module(f"delegate.{name}")


def flavour(name: str) -> ModuleType:
    for b in BACKENDS:
        module = backend(b)
        if module.FLAVOUR == name:
            return module
    raise ValueError(f"unknown export flavour {name!r}")


def preflight(name: str) -> None:
    """Fail fast when this host cannot build for backend `name` (see module docstring)."""
    check = getattr(backend(name), "preflight", None)
    if check is not None:
        check()
