"""XNNPACK: CPU delegate for linear algebra; attention and KV cache run as ExecuTorch's
custom LLM ops (``llama::custom_sdpa``, ``llama::update_cache``) outside the delegate.
"""

NAME = "xnnpack"
FLAVOUR = "et-llm-ops"
VERIFY = "runtime"
RUNTIME = "backends.et_runtime"
# ExecuTorch's TextLLMRunner (Python binding) loads these programs on this host.
LLM_RUNNER = True
# ExecuTorch's XNNPACK delegate keeps the scales of 4-bit weights under dynamically
# quantized activations (its qb4w kernels) in bf16 (``get_quant_params`` in its
# operators/node_visitor.py). The reference computes with the scales as stored, so that
# verification measures the kernels and not this rounding, which alone moved a 2-layer
# model 3,072 wide by 0.049 of the largest logit (a single linear then matches to 3e-7).
REFERENCE_SCALES = "bf16"


def lower(programs: dict, options: dict, constant_methods: dict, etrecord: bool = False):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    from backends.lowering import share_weights_with_preprocess, to_executorch

    # Its passes put new tensors in the copy's state dict (conv1d unsqueezing, batch-norm
    # fusion) and its node visitors serialize a weight through new tensors (the 4-bit
    # packing, the fp32 cast): nothing writes a tensor it reads. ExecuTorch's deep copy of
    # every partition held the quantized weights twice at the lower step's peak (3.3 of
    # Llama-3.2-3B's 11.05 GB for 8da4w fp32).
    share_weights_with_preprocess(XnnpackBackend)

    return to_executorch(programs, [XnnpackPartitioner()], constant_methods, cpu_kernels=True,
                         etrecord=etrecord, external_weights=bool(options.get("external_weights")))
