"""XNNPACK: CPU delegate for linear algebra; attention and KV cache run as ExecuTorch's
custom LLM ops (``llama::custom_sdpa``, ``llama::update_cache``) outside the delegate.
"""

NAME = "xnnpack"
FLAVOUR = "et-llm-ops"
VERIFY = "runtime"
RUNTIME = "backends.et_runtime"
# ExecuTorch's TextLLMRunner (Python binding) loads these programs on this host.
LLM_RUNNER = True


def lower(programs: dict, options: dict, constant_methods: dict, etrecord: bool = False):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    from backends.lowering import to_executorch

    return to_executorch(programs, [XnnpackPartitioner()], constant_methods, cpu_kernels=True,
                         etrecord=etrecord, external_weights=bool(options.get("external_weights")))
