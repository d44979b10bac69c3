"""XNNPACK: CPU delegate for linear algebra; attention and KV cache run as ExecuTorch's
custom LLM ops (``llama::custom_sdpa``, ``llama::update_cache``) outside the delegate.
"""

NAME = "xnnpack"
FLAVOUR = "et-llm-ops"
VERIFY = "runtime"


def attention_implementation() -> str | None:
    from delegate import et_llm_ops

    return et_llm_ops.register_attention()


def install_cache(exportable, config, max_cache_len: int, prefill_chunk: int, dtype) -> None:
    from delegate import et_llm_ops

    et_llm_ops.install_cache(exportable, config, max_cache_len, dtype)


def lower(programs: dict, options: dict, constant_methods: dict):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    from delegate.lowering import to_executorch

    return to_executorch(programs, [XnnpackPartitioner()], constant_methods, cpu_kernels=True)
