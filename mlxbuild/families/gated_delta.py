"""Hybrid decoders whose linear-attention layers are gated delta nets (Qwen3.5's
``Qwen3_5GatedDeltaNet``): a recurrent state per layer instead of a KV cache.

Each such layer carries two states across calls: the causal convolution's last
``kernel - 1`` inputs and the delta rule's ``[heads, k_dim, v_dim]`` matrix. For export
they become mutable buffers of the layer, updated in place, so a runner's decode calls
carry them as it carries a KV cache; a call at position 0 zeroes them (the next
conversation), as ExecuTorch's own Qwen3.5 export does. The recurrence itself is the
export flavour's op (``gated_delta_rule`` of ``backends.flavours``): the MLX delegate's
``mlx::gated_delta_rule`` (ExecuTorch's fused Metal kernel) or ExecuTorch's CPU kernel
``llama::gated_delta_rule``.
The full-attention layers keep the flavour's static KV cache.

The eager reference is transformers' own model and cache (``EagerHybrid``): its chunked
prefill and per-token decode kernels, which the exported recurrence is checked against.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

LINEAR = "linear_attention"


def is_hybrid(model) -> bool:
    config = getattr(model, "config", None)
    if config is None:
        return False
    return LINEAR in (getattr(config.get_text_config(), "layer_types", None) or ())


def layers(model) -> list:
    """The gated delta modules, found by what the recurrence reads."""
    wanted = ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "conv1d", "A_log", "dt_bias", "norm")
    return [m for m in model.modules() if all(hasattr(m, a) for a in wanted)]


class EagerHybrid(torch.nn.Module):
    """The eager model as the artifact is called, ``(input_ids, cache_position) -> logits``,
    over transformers' own hybrid cache; position 0 starts a new one."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.cache = None

    def forward(self, input_ids, cache_position):
        from transformers.cache_utils import DynamicCache

        if self.cache is None or int(cache_position[0]) == 0:
            self.cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True,
                         position_ids=cache_position.view(1, -1))
        return out.logits


@contextlib.contextmanager
def kv_layers_everywhere(model):
    """While the static-cache wrappers are built: every layer typed full attention, so they
    give each a KV layer (transformers' StaticCache would give a linear layer a state
    without ``keys``, which its export wrapper cannot register). The recurrent layers never
    write theirs; the real layer types are back before anything runs."""
    text = model.config.get_text_config()
    real = list(text.layer_types)
    text.layer_types = ["full_attention"] * len(real)
    try:
        yield
    finally:
        text.layer_types = real


def install(exportable, model, rule, state_shape, dtype) -> int:
    """Give every gated delta layer its states as buffers and a forward over ``rule``
    (``rule(q, k, v, decay, beta, state) -> out``, q/k/v ``[B, T, H, D]`` fp32, mutating
    ``state``); zero them at position 0. Returns how many layers were changed."""
    found = layers(model)
    for m in found:
        kernel = m.conv_kernel_size
        m.register_buffer("conv_state", torch.zeros(1, m.conv_dim, kernel - 1, dtype=dtype), persistent=False)
        m.register_buffer("recurrent_state", torch.zeros(state_shape(m.num_v_heads, m.head_k_dim, m.head_v_dim),
                                                         dtype=torch.float32), persistent=False)
        m._rule = rule
        m.forward = types.MethodType(_stateful_forward, m)
    inner = exportable.forward

    def forward(self, input_ids=None, cache_position=None, **kwargs):
        keep = (cache_position[0] != 0)
        for m in found:
            m.conv_state.mul_(keep.to(m.conv_state.dtype))
            m.recurrent_state.mul_(keep.to(m.recurrent_state.dtype))
        return inner(input_ids=input_ids, cache_position=cache_position, **kwargs)

    exportable.forward = types.MethodType(forward, exportable)
    return len(found)


def _l2norm(x, eps: float = 1e-6):
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _stateful_forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
    """transformers' gated delta forward (batch 1, no padding) with the states in buffers:
    the same projections, causal convolution, normalisation and gating, in the same dtypes."""
    batch, seq, _ = hidden_states.shape
    qkv = self.in_proj_qkv(hidden_states).transpose(1, 2)
    z = self.in_proj_z(hidden_states).reshape(batch, seq, -1, self.head_v_dim)
    b, a = self.in_proj_b(hidden_states), self.in_proj_a(hidden_states)

    window = torch.cat([self.conv_state, qkv], dim=-1)
    self.conv_state.copy_(window[:, :, -(self.conv_kernel_size - 1):])
    qkv = F.silu(F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)).transpose(1, 2)

    q, k, v = torch.split(qkv, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
    q = q.reshape(batch, seq, -1, self.head_k_dim)
    k = k.reshape(batch, seq, -1, self.head_k_dim)
    v = v.reshape(batch, seq, -1, self.head_v_dim)
    if self.num_v_heads != self.num_k_heads:  # each k head serves consecutive v heads
        q = q.repeat_interleave(self.num_v_heads // self.num_k_heads, dim=2)
        k = k.repeat_interleave(self.num_v_heads // self.num_k_heads, dim=2)
    q = _l2norm(q.float()) * self.head_k_dim ** -0.5
    k = _l2norm(k.float())
    beta = b.sigmoid().float()
    decay = (-self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)).exp()

    out = self._rule(q, k, v.float(), decay, beta, self.recurrent_state).to(hidden_states.dtype)
    out = self.norm(out.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
    return self.out_proj(out.reshape(batch, seq, -1))
