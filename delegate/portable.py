"""Portable: no delegate. Every op runs as an ExecuTorch portable (or quantized) kernel.

The export is the plain transformers graph with its StaticCache; it is the
reference flavour the other backends are checked against.
"""

NAME = "portable"
FLAVOUR = "plain"
VERIFY = "runtime"


def attention_implementation() -> str | None:
    return None


def install_cache(exportable, config, max_cache_len: int, prefill_chunk: int, dtype) -> None:
    pass  # transformers' StaticCache exports as plain index_copy over buffers


def lower(programs: dict, options: dict, constant_methods: dict):
    from delegate.lowering import to_executorch

    return to_executorch(programs, [], constant_methods, cpu_kernels=True)
