"""MLX: Apple-GPU delegate through MLX. It lowers from the ``mlx`` flavour
(``backends.flavours.mlx``: the delegate's own attention and KV cache ops), so attention
and cache updates lower into the delegate instead of falling back to portable kernels.

ExecuTorch's Linux runtime has no MLXBackend, so MLX programs are verified by running
them through ``mlx_runtime`` (the MLX payload interpreted with ``mlx.core``,
which runs on Linux CPU too; see ``RUNTIME``), and checked structurally as well:
every method calls the MLX delegate and leaves no compute to portable kernels.
"""

NAME = "mlx"
FLAVOUR = "mlx"
VERIFY = "runtime"


# ExecuTorch's Linux runtime has no MLXBackend: programs run through our MLX runtime.
RUNTIME = "mlx_runtime"


def _ready() -> None:
    from backends.mlx_schema import ensure_mlx_schema

    ensure_mlx_schema()


def lower(programs: dict, options: dict, constant_methods: dict, etrecord: bool = False):
    _ready()
    _share_weights_with_preprocess()
    from executorch.backends.mlx import MLXPartitioner
    from executorch.backends.mlx.passes import get_default_passes

    from backends.lowering import to_executorch

    # Settings from ExecuTorch's MLX LLM export: the MLX graph builder needs the
    # default passes and contiguous dim order; graph inputs are planned memory.
    return to_executorch(programs, [MLXPartitioner()], constant_methods,
                         transform_passes=get_default_passes(), skip_dim_order=True,
                         alloc_graph_input=True, etrecord=etrecord)


def _share_weights_with_preprocess() -> None:
    """ExecuTorch deep-copies each partition's program, weights included, before a backend's
    preprocess, in case the backend edits it; ``copy_exported_program_for_preprocess`` is
    the hook for a backend that doesn't need the copy, and ExecuTorch's CUDA backend uses
    it so: a copy of the graph that shares the tensors. The MLX preprocess packs weights
    into new tensors and never writes the ones it reads, so it gets the same (without it
    the lower step of a 0.6B 4-bit model held the quantized weights twice: +0.67 GB of its
    2.9 GB peak). Only the base class's copy is replaced, should a later MLXBackend bring
    its own. The .pte bytes are unchanged (tests/test_streaming.py)."""
    import copy

    import torch
    from executorch.backends.mlx.preprocess import MLXBackend
    from executorch.exir.backend.backend_details import BackendDetails

    if MLXBackend.copy_exported_program_for_preprocess.__func__ is not \
            BackendDetails.copy_exported_program_for_preprocess.__func__:
        return

    def copy_sharing_tensors(cls, edge_program, compile_specs):
        memo = {id(t): t for values in (edge_program.state_dict, edge_program.constants)
                for t in values.values() if isinstance(t, torch.Tensor)}
        return copy.deepcopy(edge_program, memo)

    MLXBackend.copy_exported_program_for_preprocess = classmethod(copy_sharing_tensors)


BACKEND_ID = "MLXBackend"
TITLE = "MLX"
# A runtime that runs any leftover op (ours runs them with torch) proves the numbers, not
# the partitioning, so every method must be delegated and leave no compute outside. The
# partitioner leaves these outside by design: writing mutable buffers back (the cache
# position the transformers wrapper stores) is not compute.
OUTSIDE_OPS = {"aten::copy_"}
