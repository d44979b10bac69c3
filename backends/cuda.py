"""CUDA: ExecuTorch's CUDA delegate, built on AOTInductor.

Lowering compiles the graph to CUDA kernels (Triton and cuBLAS calls) ahead of time
with AOTInductor, which needs a CUDA-enabled torch, a GPU and triton on the build host;
:func:`preflight` refuses a build on any other host before any step runs. The kernels
and weights go into the ``.pte`` and a ``.ptd`` beside it (``aoti_cuda_blob``).

Export flavour ``plain`` (transformers' StaticCache and SDPA), as ExecuTorch's CUDA
examples export: the CUDA backend replaces SDPA with its own Triton kernel while
lowering, and the cache writes compile into the delegate.

Not exercised on a CUDA host by this project's tests (none is available): the lowering
follows ExecuTorch's own CUDA export scripts (``examples/models/*/export*.py``).
ExecuTorch's Python runtime wheel has no CUDA backend, so programs are checked
structurally, like Core ML and Vulkan ones.
"""

from __future__ import annotations

NAME = "cuda"
FLAVOUR = "plain"
# Lowering needs a CUDA GPU (preflight), so verification runs where one is: the compiled
# kernels on the GPU through torch's AOTI runner (backends.cuda_runtime).
VERIFY = "runtime"
# Lowering and verification run on a host with a CUDA GPU: a distributed build places them on
# GPU nodes (mlxbuild.ray_executor asks for a GPU) and checks preflight() there, not on the driver.
NEEDS_GPU = True
RUNTIME = "backends.cuda_runtime"
BACKEND_ID = "CudaBackend"
TITLE = "CUDA"


def missing() -> list[str]:
    """What this host lacks to lower for CUDA (empty when it can)."""
    import importlib.util

    import torch

    problems = []
    if not torch.version.cuda:
        problems.append(f"torch {torch.__version__} is not built with CUDA")
    elif not torch.cuda.is_available():
        problems.append("no CUDA GPU is visible")
    if importlib.util.find_spec("triton") is None:
        problems.append("triton is not installed")
    return problems


def preflight() -> None:
    problems = missing()
    if problems:
        from backends.errors import BackendError

        raise BackendError(
            "backend 'cuda' cannot lower on this host: " + ", ".join(problems)
            + " (AOTInductor compiles the CUDA kernels at lowering time: build on a machine with "
            "a CUDA GPU, a CUDA build of torch and triton)")


# The export runs the flavour's own hooks (backends.flavour); plain is portable's.

def _is_bf16(program) -> bool:
    """Whether a method computes in bf16 (its floating parameters and buffers are bf16)."""
    import torch

    tensors = list(program.state_dict.values()) + list(getattr(program, "constants", {}).values())
    floats = [t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return bool(floats) and all(d == torch.bfloat16 for d in floats)


def partitioners(options: dict, programs: dict) -> dict:
    from executorch.backends.cuda.cuda_backend import CudaBackend
    from executorch.backends.cuda.cuda_partitioner import CudaPartitioner
    from executorch.exir.backend.compile_spec_schema import CompileSpec

    from backends.capabilities import CudaOptions

    opts = CudaOptions.model_validate(options)

    def on_off(flag: bool) -> bytes:
        return b"ON" if flag else b"OFF"

    def specs(method: str, program) -> list:
        # ExecuTorch's Triton SDPA kernels take bf16 only (triton/kernels/sdpa.py refuses
        # anything else); without them SDPA compiles as math (matmul + softmax).
        triton = opts.triton_kernels if opts.triton_kernels is not None else _is_bf16(program)
        return [CudaBackend.generate_method_name_compile_spec(method),
                CompileSpec("target_device", opts.device.encode()),
                CompileSpec("max_autotune", on_off(opts.max_autotune)),
                CompileSpec("low_memory_mode", on_off(opts.low_memory_mode)),
                CompileSpec("triton_kernel_mode", on_off(triton))]

    # One partitioner per method: each method's AOTInductor library is named after it.
    return {m: [CudaPartitioner(specs(m, p))] for m, p in programs.items()}


def lower(programs: dict, options: dict, constant_methods: dict, etrecord: bool = False):
    preflight()
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    # As ExecuTorch's CUDA exports: contiguous dim order, graph inputs not planned
    # (the delegate owns device memory), constants folded into the kernels.
    edge = to_edge_transform_and_lower(
        programs, partitioner=partitioners(options, programs),
        compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True),
        constant_methods=constant_methods or None, generate_etrecord=etrecord)
    prog = edge.to_executorch(config=ExecutorchBackendConfig(
        extract_delegate_segments=True, do_quant_fusion_and_const_prop=True,
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False)))
    return edge, prog


