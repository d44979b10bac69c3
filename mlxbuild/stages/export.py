"""torch.export one (scheme, flavour) and save it: every lowering starts from these files.

Here a family meets a backend: the export flavour's ops are registered, the quantized
model is loaded (with the flavour's attention where the task kind uses it) and handed
to the task kind with the flavour, which decides the methods and their example
inputs; each method's program is saved as ``<method>.pt2``.
"""

from __future__ import annotations

from pathlib import Path

import torch

import backends
from mlxbuild import families, progress
from mlxbuild.quantize import device_for
from mlxbuild.stages.quantize import quantized_model
from mlxbuild.steps import ExportParams, ExportResult


def run(params: ExportParams, cache, out: Path) -> ExportResult:
    kind = families.get(params.task)
    flavour = backends.flavour(params.flavour)
    attn = flavour.attention_implementation()
    progress.note("loading quantized model")
    model = quantized_model(cache, params, attn if kind.USES_FLAVOUR_ATTENTION else None)
    with device_for(model):  # cuda_int4 weights are traced where their kernel runs
        programs, info = kind.export(model, params.plain(), flavour)
    for name, program in programs.items():
        torch.export.save(program, out / f"{name}.pt2")
    result = ExportResult(flavour=params.flavour, task=params.task, methods=list(programs), **info,
                          graph_nodes={name: len(p.graph.nodes) for name, p in programs.items()})
    result.write(out)
    return result


def load_programs(entry: Path, flavour_name: str) -> tuple[dict, ExportResult]:
    """Reload the saved programs by method (the flavour's custom ops registered first), with
    the export's result."""
    import torchao  # noqa: F401

    backends.flavour(flavour_name).attention_implementation()
    info = ExportResult.read(entry)
    programs = {name: torch.export.load(entry / f"{name}.pt2") for name in info.methods}
    for program in programs.values():
        drop_unused_state(program)
    return programs, info


def drop_unused_state(program) -> None:
    """A tied output head is one parameter in the traced graph, under the embedding's name,
    but the program's state dict keeps the head's name too, and ``torch.export.save`` /
    ``load`` write and read it as a tensor of its own that nothing in the graph reads: for
    Qwen3-0.6B's 4-bit head another 160 MB held through the lower step. Entries the
    graph signature names neither as parameter nor buffer are dropped after loading."""
    sig = program.graph_signature
    used = set(sig.parameters) | set(sig.buffers)
    for name in [n for n in program.state_dict if n not in used]:
        del program.state_dict[name]
