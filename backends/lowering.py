"""The lowering call every backend shares: edge transform, partition, to_executorch."""

from __future__ import annotations

import re


def to_executorch(programs: dict, partitioners: list, constant_methods: dict, *,
                  transform_passes=None, skip_dim_order: bool = False, alloc_graph_input: bool = False,
                  cpu_kernels: bool = False, edit_edge=None, etrecord: bool = False,
                  external_weights: bool = False):
    """`cpu_kernels` applies what ExecuTorch's LLM export does for programs whose leftover
    ops run on CPU kernels: fuse torchao's dequantize+embedding patterns into the
    quantized embedding kernels, turn leftover matmuls back into linear, and bound
    dynamic shapes from the export's range constraints. `edit_edge(edge)` sees the lowered
    edge program before it is emitted (e.g. to make delegate payloads reproducible).
    `etrecord` has ExecuTorch record the programs for an ETRecord (`save_etrecord`).
    `external_weights` puts every weight, the delegate's and the CPU kernels', into the
    program's external data under the tag ``model`` (written as ``model.ptd``)."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    if external_weights:
        transform_passes = list(transform_passes or []) + [_weights_tagger(programs)]
    edge = to_edge_transform_and_lower(
        programs,
        transform_passes=transform_passes,
        partitioner=partitioners,
        compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=skip_dim_order),
        constant_methods=constant_methods or None,
        generate_etrecord=etrecord,
    )
    if edit_edge is not None:
        edit_edge(edge)
    extra = {}
    if cpu_kernels:
        from executorch.backends.xnnpack._passes.convert_to_linear import ConvertToLinearPass
        from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

        edge = edge.transform([ConvertToLinearPass()])
        extra = {"do_quant_fusion_and_const_prop": True,
                 "sym_shape_eval_pass": ConstraintBasedSymShapeEvalPass()}
    if external_weights:  # the weights left to CPU kernels (spec.const placeholders)
        extra["external_constants"] = lambda node: WEIGHTS_TAG
    config = ExecutorchBackendConfig(
        extract_delegate_segments=True,
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=alloc_graph_input),
        **extra,
    )
    return edge, edge.to_executorch(config=config)


WEIGHTS_TAG = "model"  # the external data's name: model.ptd


def share_weights_with_preprocess(backend_cls) -> None:
    """ExecuTorch deep-copies each partition's program, weights included, before a backend's
    preprocess, in case the backend edits it: every partition at once, so the lower step holds
    the program's weights twice. ``copy_exported_program_for_preprocess`` is the hook for a
    backend that doesn't need the copy, and ExecuTorch's CUDA backend uses it so: a copy of
    the graph that shares the tensors. A backend calls this for its own class only where its
    preprocess never writes a tensor it reads (the backend module says why); the .pte bytes
    are unchanged (tests/test_streaming.py). Only the base
    class's copy is replaced, should a later ExecuTorch bring the backend's own."""
    import copy

    import torch
    from executorch.exir.backend.backend_details import BackendDetails

    if backend_cls.copy_exported_program_for_preprocess.__func__ is not \
            BackendDetails.copy_exported_program_for_preprocess.__func__:
        return

    def copy_sharing_tensors(cls, edge_program, compile_specs):
        memo = {id(t): t for values in (edge_program.state_dict, edge_program.constants)
                for t in values.values() if isinstance(t, torch.Tensor)}
        return copy.deepcopy(edge_program, memo)

    backend_cls.copy_exported_program_for_preprocess = classmethod(copy_sharing_tensors)


def _weights_tagger(programs: dict):
    """A transform pass (after to_edge, before partitioning) that tags every placeholder but
    the user inputs and the buffers (the KV cache, which the program mutates): parameters and
    constants, those lifted while lowering to edge included (torchao's quantized weights
    become such constants), for the delegate to put in the named data store's external
    file. ExecuTorch's LLM export does this with ``delegate_external_constants_pass_unlifted``
    on the unlifted graph; on the lifted one the saved program need not be exported again."""
    from executorch.exir.pass_base import PassResult

    kept = set()
    for ep in programs.values():
        sig = ep.graph_signature
        kept |= set(sig.user_inputs) | set(sig.inputs_to_buffers)

    def tag_weights(gm):
        for node in gm.graph.nodes:
            if node.op == "placeholder" and node.name not in kept:
                node.meta.setdefault("custom", {})["delegate_constant_tag"] = WEIGHTS_TAG
        return PassResult(gm, True)

    return tag_weights


# ExecuTorch's ETRecord names graphs and modules by Python object ids (``id(graph)`` in every
# node's provenance and in ``export_graph_id``, ``Class;id(module)`` in every node's module
# stack, ``<function f at 0x...>`` in provenance targets) and zips with the wall clock, so two lowerings of one model give different files.
# Ids renumbered in order of appearance (a bijection, so the Inspector's matching of
# provenance to the exported graph, and of nodes to module instances, still holds) and
# fixed zip times give the same bytes, as every other published file has.
_OBJECT_ID = re.compile(rb'(graph_id\\*"\s*:\s*|\w;)(\d{6,})|( at 0x)([0-9a-f]+)')


def save_etrecord(prog, path) -> None:
    """Write the ETRecord ExecuTorch recorded while lowering ``prog``, reproducibly."""
    import io
    import zipfile

    raw = io.BytesIO()
    prog.get_etrecord().save(raw)
    ids: dict[bytes, int] = {}

    def renumber(object_id: bytes) -> bytes:
        return str(ids.setdefault(object_id, len(ids) + 1)).encode()

    out = io.BytesIO()
    with zipfile.ZipFile(raw) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "export_graph_id":
                data = renumber(data.strip())
            elif data[:1] == b"{":  # the serialized graphs; weights and inputs are left as they are
                data = _OBJECT_ID.sub(lambda m: m.group(1) + renumber(m.group(2)) if m.group(1)
                                      else m.group(3) + renumber(m.group(4)), data)
            dst.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)), data)
    with open(path, "wb") as f:
        f.write(out.getvalue())
