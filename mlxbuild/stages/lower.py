"""Lower one target from its saved programs (one per method) and serialize the .pte (and
.ptd): the backend lowers, the task kind names the constant methods its runners read."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import backends
from mlxbuild import families, progress
from mlxbuild.stages import export
from mlxbuild.steps import ExportResult, LowerParams, LowerResult

ETRECORD = "model.etrecord"


def constant_methods(params: LowerParams, info: ExportResult) -> dict:
    """The task kind's constant methods (what its runners read), then the manifest's own on top."""
    methods = families.get(params.task).constant_methods(params.plain(), info.model_dump(mode="json"))
    methods.update(params.constant_methods or {})
    return methods


def delegation_summary(edge) -> dict:
    """Per method: which ops the delegate took and which stay on portable kernels."""
    from executorch.exir.lowered_backend_module import get_lowered_submodules

    summary = {}
    for method in edge.methods:
        gm = edge.exported_program(method).graph_module
        outside = Counter()
        for node in gm.graph.nodes:
            if node.op == "call_function" and "executorch_call_delegate" not in str(node.target):
                if node.target.__name__ != "getitem":
                    outside[_op_name(node.target)] += 1
        inside = Counter()
        delegate_ids = []
        for _, lowered, _ in get_lowered_submodules(gm):
            delegate_ids.append(lowered.backend_id)
            for node in lowered.original_module.graph.nodes:
                if node.op == "call_function" and node.target.__name__ != "getitem":
                    inside[_op_name(node.target)] += 1
        summary[method] = {"delegates": delegate_ids, "delegated_ops": dict(sorted(inside.items())),
                           "portable_ops": dict(sorted(outside.items()))}
    return summary


def _op_name(target) -> str:
    name = getattr(target, "__name__", str(target))
    return name.removeprefix("aten.")


def run(params: LowerParams, cache, out: Path) -> LowerResult:
    backend = backends.backend(params.backend)
    entry = cache.read("export", params.export)
    progress.note("loading saved program")
    programs, info = export.load_programs(entry, backends.flavour_of(params.backend, params.options))
    methods = constant_methods(params, info)
    progress.note(f"lowering {', '.join(programs)} to {backend.NAME} and serializing")
    edge, prog = backend.lower(programs, params.options or {}, methods, etrecord=params.etrecord)
    # Written from ExecuTorch's segments as they are: ``prog.buffer`` would join them into one
    # more copy of the program (the lower step's peak for a 0.6B model).
    with open(out / "model.pte", "wb") as f:
        prog.write_to_file(f)
    progress.note(f"{(out / 'model.pte').stat().st_size / 1e6:.1f} MB program")
    if getattr(prog, "_tensor_data", None):
        prog.write_tensor_data_to_file(str(out))
    etrecord, problem = None, None
    if params.etrecord:
        from backends.lowering import save_etrecord

        try:
            save_etrecord(prog, out / ETRECORD)
            etrecord = ETRECORD
        except Exception as e:  # noqa: BLE001 - a debugging aid must not cost the artifact
            # ExecuTorch's exported-program serializer refuses some symbolic-shape graphs
            # (operator.neg on a dynamic size in Parakeet's encoder, for one).
            (out / ETRECORD).unlink(missing_ok=True)
            problem = f"ExecuTorch could not serialize the ETRecord: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            progress.note(f"no ETRecord: {problem}")
    result = LowerResult(constant_methods=methods, delegation=delegation_summary(edge),
                         ptd=sorted(p.name for p in out.glob("*.ptd")),
                         etrecord=etrecord, etrecord_problem=problem)
    result.write(out)
    return result
