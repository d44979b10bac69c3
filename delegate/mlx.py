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


SLIDING_ATTENTION = "mlxbuild_mlx_sliding"


def install_cache(exportable, config, max_cache_len: int, prefill_chunk: int, dtype) -> None:
    """The MLX flavour's source transforms on a transformers exportable: MoE experts
    onto gather_(q)mm, the KV cache onto mlx::kv_cache_update (a ring of window +
    chunk - 1 slots for sliding-window layers), and the sliding layers' attention
    onto the ring's window mask."""
    _ready()
    from executorch.backends.mlx.llm.exportable import install_mlx_cache

    from mlxbuild.llm import check_prefill_chunk, sliding_layers

    check_prefill_chunk(config, prefill_chunk)
    gather_experts(exportable.model)
    install_mlx_cache(exportable, config=config, max_batch_size=1, max_cache_len=max_cache_len,
                      dtype=dtype, prefill_chunk_size=prefill_chunk)
    _positions_from_cache_position(exportable.static_cache)
    _accept_call_kwargs(exportable.static_cache)
    if sliding_layers(config):
        _use_sliding_attention(exportable)


def _positions_from_cache_position(cache) -> None:
    """transformers derives position ids from ``cache.get_seq_length()``. ExecuTorch's
    HFStaticCache answers by counting the non-zero slots of layer 0's buffer, which
    saturates once a ring buffer (a sliding layer) is full: every later token would get
    the same position. Answer with the position the wrapper writes into each layer
    before every call (cache_position[0]), as transformers' own StaticLayer does."""
    import types

    def get_seq_length(self, layer_idx: int = 0):
        return self.layers[layer_idx].cumulative_length

    cache.get_seq_length = types.MethodType(get_seq_length, cache)


def _accept_call_kwargs(cache) -> None:
    """transformers 5.24 calls ``cache.update(k, v, layer_idx, kwargs=kwargs)``, handing the
    attention call's extra arguments down to the cache layers; ExecuTorch 1.5.1's
    HFStaticCache.update takes only ``cache_kwargs`` and fails to bind. Its layers need
    none of them (the write position is each layer's cumulative_length, which the wrapper
    sets before every call; 5.23 passed nothing), so they are dropped."""
    import types

    update = type(cache).update

    def update_any(self, key_states, value_states, layer_idx, cache_kwargs=None, **_call_kwargs):
        return update(self, key_states, value_states, layer_idx, cache_kwargs)

    cache.update = types.MethodType(update_any, cache)


def _use_sliding_attention(exportable) -> None:
    from types import SimpleNamespace

    from executorch.backends.mlx.llm.hf_attention import (
        get_mlx_sliding_window_sdpa,
        sdpa_mask_passthrough,
    )
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    # ExecuTorch's sliding SDPA finds each layer's ring through `.cache`; our wrapper
    # keeps it in `.static_cache`, so hand it a view. Full-attention layers fall
    # through to the regular mlx::custom_sdpa path.
    attend = get_mlx_sliding_window_sdpa(SimpleNamespace(cache=exportable.static_cache))
    ALL_ATTENTION_FUNCTIONS.register(SLIDING_ATTENTION, attend)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SLIDING_ATTENTION, sdpa_mask_passthrough)
    exportable.model.config._attn_implementation = SLIDING_ATTENTION


def gather_experts(model) -> int:
    """Replace each ``mlxbuild.moe.ExpertLinears`` by ExecuTorch's SwitchMLP over the same
    (already quantized) per-expert linears, packed into [E, out, in] stacks, so routing
    lowers to mlx::gather_qmm (quantized) / mlx::gather_mm and computes only the chosen
    experts. Returns how many blocks were replaced."""
    import torch
    from executorch.backends.mlx.llm.switch import SwitchMLP

    from mlxbuild.errors import BuildError
    from mlxbuild.moe import ExpertLinears

    class GatherExperts(torch.nn.Module):
        def __init__(self, mlp):
            super().__init__()
            self.mlp = mlp

        def forward(self, hidden_states, top_k_index, top_k_weights):
            top_k = top_k_index.shape[-1]
            return self.mlp(hidden_states, top_k_weights.to(hidden_states.dtype), top_k_index, top_k)

    names = [n for n, m in model.named_modules() if isinstance(m, ExpertLinears)]
    for name in names:
        experts = model.get_submodule(name)
        with torch.device("meta"):  # SwitchLinear builds throwaway experts; ours replace them
            mlp = SwitchMLP(experts.hidden, experts.intermediate, experts.num_experts,
                            activation=experts.act_fn)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            switch = getattr(mlp, proj)
            switch.experts = getattr(experts, proj)
            try:
                switch.pack()
            except TypeError as e:
                raise BuildError(f"{name}.{proj}: MoE experts cannot use MLX gather_qmm: {e}; "
                                 "use an affine weight-only scheme for MLX targets") from None
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, GatherExperts(mlp))
    return len(names)


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


def check_structure(info: dict, methods: tuple = ("forward",)) -> dict:
    """The structural check used where no MLX runtime exists: the program
    deserialized (``info`` exists), has the task's ``methods``, every method calls the
    MLX delegate, and no compute is left to portable kernels."""
    problems, expected, methods = [], methods, info.get("methods", {})
    for name in expected:
        if name not in methods:
            problems.append(f"no {name} method")
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
