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
    from executorch.backends.mlx import MLXPartitioner
    from executorch.backends.mlx.passes import get_default_passes

    from backends.lowering import to_executorch

    # Settings from ExecuTorch's MLX LLM export: the MLX graph builder needs the
    # default passes and contiguous dim order; graph inputs are planned memory.
    return to_executorch(programs, [MLXPartitioner()], constant_methods,
                         transform_passes=get_default_passes(), skip_dim_order=True,
                         alloc_graph_input=True, etrecord=etrecord)


BACKEND_ID = "MLXBackend"
TITLE = "MLX"
# A runtime that runs any leftover op (ours runs them with torch) proves the numbers, not
# the partitioning, so every method must be delegated and leave no compute outside. The
# partitioner leaves these outside by design: writing mutable buffers back (the cache
# position the transformers wrapper stores) is not compute.
OUTSIDE_OPS = {"aten::copy_"}
