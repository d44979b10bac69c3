"""Portable: no delegate. Every op runs as an ExecuTorch portable (or quantized) kernel.

It lowers from the ``plain`` flavour (``backends.flavours.plain``): the transformers
graph with its StaticCache.
"""

NAME = "portable"
FLAVOUR = "plain"
VERIFY = "runtime"
RUNTIME = "backends.et_runtime"
# ExecuTorch's TextLLMRunner (Python binding) loads these programs on this host.
LLM_RUNNER = True


def lower(programs: dict, options: dict, constant_methods: dict, etrecord: bool = False):
    from backends.lowering import to_executorch

    return to_executorch(programs, [], constant_methods, cpu_kernels=True, etrecord=etrecord,
                         external_weights=bool(options.get("external_weights")))
