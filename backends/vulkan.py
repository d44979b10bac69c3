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
    from executorch.backends.vulkan.serialization.vulkan_graph_serialize import extract_vk_flatbuffer

    try:
        graph = _vk_graph(extract_vk_flatbuffer(blob))
    except Exception as e:
        return f"not a Vulkan graph: {e}"
    return "" if graph.chain else "the Vulkan graph has no ops"


def _vk_graph(flatbuffer: bytes):
    """ExecuTorch's ``flatbuffer_to_vk_graph``, except for one thing: it reads flatc's JSON
    with ``json.load``, which refuses the bare ``inf`` / ``nan`` flatc writes for a float
    constant (an attention mask's -inf, a clamp's bound); those are spelled as Python's json
    reads them. (ExecuTorch's decompile and dataclass helpers are private; no public API
    reads a Vulkan payload back.)"""
    import json
    import os
    import re
    import tempfile
    from importlib import resources

    from executorch.backends.vulkan import serialization
    from executorch.backends.vulkan.serialization import vulkan_graph_serialize as vgs

    with tempfile.TemporaryDirectory() as d:
        schema = os.path.join(d, "schema.fbs")
        with open(schema, "wb") as f:
            f.write(resources.files(serialization).joinpath("schema.fbs").read_bytes())
        binary = os.path.join(d, "schema.bin")
        with open(binary, "wb") as f:
            f.write(flatbuffer)
        vgs._flatc_decompile(d, schema, binary, ["--raw-binary"])
        with open(os.path.join(d, "schema.json")) as f:
            text = f.read()
    text = re.sub(r"(?<![\w.\"])(-?)inf(?![\w\"])", lambda m: f"{m.group(1)}Infinity", text)
    text = re.sub(r"(?<![\w.\"])-?nan(?![\w\"])", "NaN", text)
    return vgs._json_to_dataclass(json.loads(text), vgs.VkGraph)
