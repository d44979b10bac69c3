"""torch.export one (scheme, flavour) and save it: every lowering starts from these files.

Here a family meets a backend: the export flavour's ops are registered, the quantized
model is loaded (with the flavour's attention where the task kind uses it) and handed
to the task kind with the flavour, which decides the methods and their example
inputs; each method's program is saved as ``<method>.pt2``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

import backends
from mlxbuild import families, progress
from mlxbuild.families import streaming
from mlxbuild.quantize import device_for
from mlxbuild.stages.quantize import quantized_model
from mlxbuild.steps import ExportParams, ExportResult


def run(params: ExportParams, cache, out: Path) -> ExportResult:
    kind = families.get(params.task)
    flavour = backends.flavour(params.flavour)
    attn = flavour.attention_implementation()
    progress.note("loading quantized model")
    model = quantized_model(cache, params, attn if kind.USES_FLAVOUR_ATTENTION else None)
    with device_for(model), weights_not_cloned():  # cuda_int4 weights are traced where their kernel runs
        programs, info = kind.export(model, params.plain(), flavour)
    # Tracing leaves its freed memory in the heap's holes; saving adds two copies of each
    # tensor in turn and reads in every page of the quantized state the trace never touched.
    streaming.trim()
    for name, program in programs.items():
        torch.export.save(program, out / f"{name}.pt2")
    result = ExportResult(flavour=params.flavour, task=params.task, methods=list(programs), **info,
                          graph_nodes={name: len(p.graph.nodes) for name, p in programs.items()})
    result.write(out)
    return result


@contextlib.contextmanager
def weights_not_cloned():
    """Strict ``torch.export`` (dynamo) keeps a clone of every real input it wraps, for the
    rare data-dependent branch it evaluates on real values; torchao's quantized weights are
    tensor subclasses, never faked, so each is cloned whole while the model still holds it:
    a second copy of the quantized state at the step's peak (0.6 GB for Qwen3-0.6B at 4 bits).
    Parameters are handed over uncloned (their example is what such a branch would read
    anyway, and nothing in a forward writes a parameter); buffers, which a forward may
    mutate (the KV cache), are still cloned. The saved programs' bytes do not change
    (tests/test_streaming.py)."""
    from torch._dynamo.variables import builder

    clone = builder._clone_input

    def keep_parameters(value, fake_mode):
        return value if isinstance(value, torch.nn.Parameter) else clone(value, fake_mode)

    builder._clone_input = keep_parameters
    try:
        yield
    finally:
        builder._clone_input = clone


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
