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


def flavour_for(options: dict) -> str:
    """``kv_cache: turboquant`` exports with ExecuTorch's TurboQuant cache (``mlx-tq4``)."""
    return "mlx-tq4" if options.get("kv_cache") == "turboquant" else FLAVOUR


# ExecuTorch's Linux runtime has no MLXBackend: programs run through our MLX runtime.
RUNTIME = "mlx_runtime"


def _ready() -> None:
    from backends.mlx_schema import ensure_mlx_schema

    ensure_mlx_schema()


def lower(programs: dict, options: dict, constant_methods: dict, etrecord: bool = False):
    _ready()
    from executorch.backends.mlx import MLXPartitioner
    from executorch.backends.mlx.passes import get_default_passes
    from executorch.backends.mlx.preprocess import MLXBackend

    from backends.lowering import share_weights_with_preprocess, to_executorch

    # The MLX preprocess packs weights into new tensors and never writes the ones it reads
    # (with ExecuTorch's deep copy the lower step of a 0.6B 4-bit model held the quantized
    # weights twice: +0.67 GB of its 2.9 GB peak).
    share_weights_with_preprocess(MLXBackend)
    _pack_in_row_blocks()

    # Settings from ExecuTorch's MLX LLM export: the MLX graph builder needs the
    # default passes and contiguous dim order; graph inputs are planned memory.
    return to_executorch(programs, [MLXPartitioner()], constant_methods,
                         transform_passes=get_default_passes(), skip_dim_order=True,
                         alloc_graph_input=True, etrecord=etrecord)


def _pack_in_row_blocks() -> None:
    """ExecuTorch's MLX preprocess packs each quantized weight into MLX's layout
    (``to_mlx_qparams``) in one go, through temporaries of the whole weight (an unsigned
    copy, the shifted nibbles: 2.5x the packed size), and packs a weight again at every node
    that reads it (a tied embedding and output head: twice), keeping the first packing.
    For Qwen3-0.6B's 151,936 x 1,024 4-bit embedding the second packing's temporaries were
    the lower step's peak. Packing is row by row (each row is whole uint32 words, its biases
    its own scales'), so packing ``ROWS`` rows at a time into the finished tensors gives the
    same bytes (tests/test_streaming.py) with temporaries of one block."""
    import executorch.backends.mlx.ops as ops
    import executorch.backends.mlx.patterns as patterns
    import torch

    if getattr(patterns.to_mlx_qparams, "mlxbuild_blocks", False):
        return
    pack = patterns.to_mlx_qparams

    def to_mlx_qparams(qdata, scale, zero_point, bits, compute_biases=True, prepacked=False):
        rows = qdata.shape[0] if qdata.dim() == 2 else 0
        if prepacked or rows <= PACK_ROWS or scale.shape[0] != rows or \
                (zero_point is not None and zero_point.shape[0] != rows):
            return pack(qdata, scale, zero_point, bits, compute_biases, prepacked)
        out_q = out_b = None
        for r in range(0, rows, PACK_ROWS):
            block = slice(r, r + PACK_ROWS)
            q, b = pack(qdata[block], scale[block], None if zero_point is None else zero_point[block],
                        bits, compute_biases, prepacked)
            if out_q is None:
                out_q = torch.empty((rows, *q.shape[1:]), dtype=q.dtype)
                out_b = None if b is None else torch.empty((rows, *b.shape[1:]), dtype=b.dtype)
            out_q[block] = q
            if b is not None:
                out_b[block] = b
        return out_q, out_b

    to_mlx_qparams.mlxbuild_blocks = True
    patterns.to_mlx_qparams = ops.to_mlx_qparams = to_mlx_qparams


PACK_ROWS = 8192  # 8 MB of int8 at 1,024 columns


BACKEND_ID = "MLXBackend"
TITLE = "MLX"
# A runtime that runs any leftover op (ours runs them with torch) proves the numbers, not
# the partitioning, so every method must be delegated and leave no compute outside. The
# partitioner leaves these outside by design: writing mutable buffers back (the cache
# position the transformers wrapper stores) is not compute.
OUTSIDE_OPS = {"aten::copy_"}
