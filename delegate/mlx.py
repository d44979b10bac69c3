"""MLX: Apple-GPU delegate through MLX. The export uses the MLX delegate's own attention
(``mlx::custom_sdpa``) and KV cache (``mlx::kv_cache_update``), so attention and cache
updates lower into the delegate instead of falling back to portable kernels.

ExecuTorch's Linux runtime has no MLXBackend, so MLX programs are verified by running
them through ``delegate.mlx_runtime`` (the MLX payload interpreted with ``mlx.core``,
which runs on Linux CPU too; see ``load_method``), and checked structurally as well:
every method calls the MLX delegate and leaves no compute to portable kernels.
"""

NAME = "mlx"
FLAVOUR = "mlx"
VERIFY = "runtime"


def load_method(pte, method: str = "forward"):
    """``execute(inputs) -> outputs`` for ``method`` of an MLX ``.pte``, run on this host
    through ``mlx.core`` (torch tensors in, torch tensors out; the KV cache persists
    across calls as with ExecuTorch's ``Method.execute``)."""
    from delegate import mlx_runtime

    program = mlx_runtime.load(pte)
    return lambda inputs: program.run(method, list(inputs))


def _ready() -> None:
    from delegate.mlx_schema import ensure_mlx_schema

    ensure_mlx_schema()


def attention_implementation() -> str | None:
    _ready()
    from executorch.backends.mlx.llm.hf_attention import register_mlx_attention

    register_mlx_attention("mlx")
    return "mlx"


def install_cache(exportable, config, max_cache_len: int, prefill_chunk: int, dtype) -> None:
    _ready()
    from executorch.backends.mlx.llm.exportable import install_mlx_cache

    install_mlx_cache(exportable, config=config, max_batch_size=1, max_cache_len=max_cache_len,
                      dtype=dtype, prefill_chunk_size=prefill_chunk)


def lower(programs: dict, options: dict, constant_methods: dict):
    _ready()
    from executorch.backends.mlx import MLXPartitioner
    from executorch.backends.mlx.passes import get_default_passes

    from delegate.lowering import to_executorch

    # Settings from ExecuTorch's MLX LLM export: the MLX graph builder needs the
    # default passes and contiguous dim order; graph inputs are planned memory.
    return to_executorch(programs, [MLXPartitioner()], constant_methods,
                         transform_passes=get_default_passes(), skip_dim_order=True,
                         alloc_graph_input=True)


# Kernels the partitioner leaves outside by design: writing mutable buffers back
# (the cache position the transformers wrapper stores) is not compute.
BOOKKEEPING_OPS = {"aten::copy_"}


def check_structure(info: dict) -> dict:
    """The structural check used where no MLX runtime exists: the program
    deserialized (``info`` exists), every method calls the MLX delegate, and no
    compute is left to portable kernels."""
    problems, methods = [], info.get("methods", {})
    if "forward" not in methods:
        problems.append("no forward method")
    for name, method in methods.items():
        backends = {d["backend_id"] for d in method.get("delegates", [])}
        if "MLXBackend" not in backends:
            problems.append(f"{name}: MLX delegate missing (delegates: {sorted(backends) or 'none'})")
        left = [op for op in method.get("operators", []) if op.split(".")[0] not in BOOKKEEPING_OPS]
        if left:
            problems.append(f"{name}: ops outside the delegate: {', '.join(left)}")
    return {"passed": not problems, "executed": False, "reason": "; ".join(problems),
            "check": "structural (no MLX runtime on this host)",
            "delegates": sorted({d["backend_id"] for m in methods.values() for d in m.get("delegates", [])})}
