"""The lowering call every backend shares: edge transform, partition, to_executorch."""

from __future__ import annotations


def to_executorch(programs: dict, partitioners: list, constant_methods: dict, *,
                  transform_passes=None, skip_dim_order: bool = False, alloc_graph_input: bool = False,
                  cpu_kernels: bool = False, edit_edge=None):
    """`cpu_kernels` applies what ExecuTorch's LLM export does for programs whose leftover
    ops run on CPU kernels: fuse torchao's dequantize+embedding patterns into the
    quantized embedding kernels, turn leftover matmuls back into linear, and bound
    dynamic shapes from the export's range constraints. `edit_edge(edge)` sees the lowered
    edge program before it is emitted (e.g. to make delegate payloads reproducible)."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    edge = to_edge_transform_and_lower(
        programs,
        transform_passes=transform_passes,
        partitioner=partitioners,
        compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=skip_dim_order),
        constant_methods=constant_methods or None,
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
    config = ExecutorchBackendConfig(
        extract_delegate_segments=True,
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=alloc_graph_input),
        **extra,
    )
    return edge, edge.to_executorch(config=config)
