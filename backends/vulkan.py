"""Vulkan: ExecuTorch's GPU delegate for Android and desktop GPUs (compute shaders).

Export flavour ``et-llm-ops`` (shared with XNNPACK): ExecuTorch's LLM custom ops
``llama::update_cache`` and ``llama::custom_sdpa``, which the Vulkan delegate implements
itself (``op_registry.py``: SDPA.cpp), so attention and the KV-cache writes lower into
the delegate instead of staying outside as they would with the plain transformers graph.

Lowering runs on Linux (the partitioner and the graph serializer are Python). ExecuTorch's
Python runtime on this host has no Vulkan backend, so programs are checked structurally.
"""

from __future__ import annotations

NAME = "vulkan"
FLAVOUR = "et-llm-ops"
VERIFY = "structural"
BACKEND_ID = "VulkanBackend"
TITLE = "Vulkan"


# The export runs the flavour's own hooks (backends.flavour); et-llm-ops is XNNPACK's.

def partitioner(options: dict):
    from executorch.backends.vulkan import VulkanPartitioner

    from backends.capabilities import VulkanOptions

    opts = VulkanOptions.model_validate(options)
    compile_options = {"force_fp16": opts.force_fp16, "small_texture_limits": opts.small_texture_limits,
                       "require_dynamic_shapes": opts.require_dynamic_shapes,
                       "downcast_64_bit": opts.downcast_64_bit}
    if opts.texture_limits is not None:
        compile_options["texture_limits"] = tuple(opts.texture_limits)
    if opts.buffer_limit is not None:
        compile_options["buffer_limit"] = opts.buffer_limit
    return VulkanPartitioner(compile_options, operator_blocklist=[_edge_op(n) for n in opts.skip_ops] or None)


def _edge_op(name: str):
    """``aten.embedding.default`` -> the edge-dialect op the partitioner compares with."""
    from executorch.exir.dialects._ops import ops as exir_ops

    from backends.errors import BackendError

    target = exir_ops.edge
    try:
        for part in name.split("."):
            target = getattr(target, part)
    except (AttributeError, RuntimeError):
        raise BackendError(f"vulkan skip_ops: no edge op named {name!r} (e.g. aten.embedding.default)") from None
    return target


def lower(programs: dict, options: dict, constant_methods: dict, etrecord: bool = False):
    from backends.lowering import to_executorch

    return to_executorch(programs, [partitioner(options)], constant_methods, cpu_kernels=True,
                         etrecord=etrecord)




def payload_problem(blob: bytes) -> str:
    """"" when ``blob`` is a serialized Vulkan graph with at least one op."""
    from executorch.backends.vulkan.serialization.vulkan_graph_serialize import (
        extract_vk_flatbuffer, flatbuffer_to_vk_graph)

    try:
        graph = flatbuffer_to_vk_graph(extract_vk_flatbuffer(blob))
    except Exception as e:
        return f"not a Vulkan graph: {e}"
    return "" if graph.chain else "the Vulkan graph has no ops"
