"""Backend knowledge: one module per ExecuTorch backend, the export flavours they lower
from (``backends.flavours``), and the one place that picks the runtime for an artifact.

This package stands alone: it imports nothing of mlxbuild (its errors are
``backends.errors``), and it never imports a model family; a stage hands it what the
family built. Each backend module is importable without torch (the planner reads its
constants); everything that needs torch or executorch is imported inside functions.
A backend module provides:

- ``NAME``; ``FLAVOUR``: the export flavour it lowers from (backends sharing a flavour
  share one export);
- ``VERIFY``: ``"runtime"`` when this host can execute its programs (then ``RUNTIME``:
  the module whose ``load(pte, data_files)`` runs them: ``backends.et_runtime`` or our
  ``mlx_runtime``), or ``"structural"`` when it can only inspect them;
- ``BACKEND_ID``, ``TITLE`` (and optionally ``OUTSIDE_OPS``, ``payload_problem(blob)``):
  what ``backends.structural`` checks of a lowered program;
- ``lower(programs, options, constant_methods)``: ``(edge, program manager)``; ``options``
  are the target's, validated by the backend's model in ``capabilities.py``;
- optionally ``preflight()``: raise ``BackendError`` when this host cannot lower for the
  backend at all (checked once per build, before any step runs);
- optionally ``NEEDS_GPU``: its lowering and verification need a GPU host (a distributed
  build schedules them on GPU nodes and runs ``preflight()`` there).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

BACKENDS = ("mlx", "xnnpack", "portable", "coreml", "vulkan", "cuda")
# The runtime of programs whose backend is not known (an artifact given by path).
DEFAULT_RUNTIME = "backends.et_runtime"


def backend(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not supported yet (supported: {', '.join(BACKENDS)})")
    return importlib.import_module(f"backends.{name}")


def flavour(name: str) -> ModuleType:
    from backends.flavours import MODULES

    if name not in MODULES:
        raise ValueError(f"unknown export flavour {name!r} (known: {', '.join(MODULES)})")
    return importlib.import_module(f"backends.flavours.{MODULES[name]}")


def flavour_of(backend_name: str, options: dict | None = None) -> str:
    """The export flavour a target lowers from: its backend's ``FLAVOUR``, or the one its
    options pick (``flavour_for(options)``: an MLX target's TurboQuant cache)."""
    module = backend(backend_name)
    pick = getattr(module, "flavour_for", None)
    return pick(options or {}) if pick else module.FLAVOUR


def flavour_module_name(name: str) -> str:
    from backends.flavours import MODULES

    return f"backends.flavours.{MODULES[name]}"


def preflight(name: str) -> None:
    """Fail fast when this host cannot build for backend `name` (see module docstring)."""
    check = getattr(backend(name), "preflight", None)
    if check is not None:
        check()


def runtime_module_name(name: str) -> str | None:
    """The module that runs backend `name`'s programs on this host (None: none does)."""
    module = backend(name)
    return getattr(module, "RUNTIME", DEFAULT_RUNTIME) if module.VERIFY == "runtime" else None


def check_structure(name: str, info: dict, methods: tuple = ("forward",)) -> dict:
    """The structural check of backend `name` on a program ``info`` (``inspect_pte``'s)."""
    from pathlib import Path

    from backends import structural

    return structural.check(Path(info["path"]), info, backend(name), tuple(methods))


def open_program(pte: str | os.PathLike, backend_name: str | None = None, data_files=()):
    """The program on the runtime that runs it here: the backend's ``RUNTIME``, or for an
    artifact of unknown backend, our MLX runtime when it calls the MLX delegate (ExecuTorch's
    Linux runtime has none) and ExecuTorch's otherwise. Both have ``method_names``,
    ``constant_methods``, ``run(method, inputs)``, ``reset(method)`` and ``input_dtype``."""
    if backend_name is not None:
        runtime = runtime_module_name(backend_name)
        if runtime is None:
            raise ValueError(f"no {backend(backend_name).TITLE} runtime on this host")
    else:
        from mlx_runtime import pte as container

        program, _, _ = container.load(pte)
        called = {d.id for plan in program.execution_plan for d in plan.delegates}
        runtime = backend("mlx").RUNTIME if "MLXBackend" in called else DEFAULT_RUNTIME
    return importlib.import_module(runtime).load(pte, data_files)
