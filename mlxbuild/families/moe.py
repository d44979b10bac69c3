"""Mixture-of-experts blocks in a form quantization and export can reach.

transformers keeps a sparse block's experts as 3-D parameters (Qwen3-MoE's
``experts.gate_up_proj[E, 2I, H]`` and ``experts.down_proj[E, H, I]``) and routes
tokens with a data-dependent loop. Neither survives our pipeline: the scheme's
linear rule only quantizes ``nn.Linear`` modules, and strict ``torch.export`` cannot
trace ``nonzero``. ``unfuse_experts`` therefore swaps each such experts module for
``ExpertLinears``: one ``nn.Linear`` per expert and projection (named
``...experts.gate_proj.<e>``, ``...experts.up_proj.<e>``, ``...experts.down_proj.<e>``,
so per-layer quantization rules can address them), with a forward that runs every
expert on every token and weights it by its routing weight (zero when not chosen).
That is exact, exportable and lowers anywhere; it costs num_experts / top_k times
the routed compute, which is what XNNPACK and portable targets pay. MLX targets
repack the same (quantized) linears into ``mlx::gather_qmm`` / ``mlx::gather_mm``
(``backends.flavours.mlx.gather_experts``, handed this class by the text family), which compute only the chosen experts.

The swap happens when a model is loaded (``mlxbuild.families.hf.load_model``), so the
quantize, export and reference steps all see the same module names.
"""

from __future__ import annotations

import torch
from torch import nn


class ExpertLinears(nn.Module):
    """Gated experts (``down(act(gate(x)) * up(x))``) as per-expert ``nn.Linear``."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act, dtype):
        super().__init__()
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self.act_fn = act

        def linears(n_in, n_out):
            return nn.ModuleList(nn.Linear(n_in, n_out, bias=False, dtype=dtype, device="meta")
                                 for _ in range(num_experts))

        self.gate_proj = linears(hidden, intermediate)
        self.up_proj = linears(hidden, intermediate)
        self.down_proj = linears(intermediate, hidden)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            # The routing weight of expert e for each token (0 where e was not chosen).
            weight = (top_k_weights * (top_k_index == e).to(top_k_weights.dtype)).sum(-1, keepdim=True)
            h = self.act_fn(self.gate_proj[e](hidden_states)) * self.up_proj[e](hidden_states)
            out = out + weight.to(hidden_states.dtype) * self.down_proj[e](h)
        return out


def _is_fused_experts(module: nn.Module) -> bool:
    # transformers' @use_experts_implementation layout: concatenated [gate; up], not
    # transposed, no bias. Other layouts are left alone (and then not quantized).
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)
            and gate_up.dim() == 3 and down.dim() == 3
            and getattr(module, "is_concatenated", True) and not getattr(module, "is_transposed", False)
            and not getattr(module, "has_bias", False) and getattr(module, "has_gate", True))


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused 3-D experts module by ``ExpertLinears``, in place; return how many."""
    names = [n for n, m in model.named_modules() if n and _is_fused_experts(m)]
    for name in names:
        fused = model.get_submodule(name)
        num_experts, two_i, hidden = fused.gate_up_proj.shape
        inter = two_i // 2
        experts = ExpertLinears(num_experts, hidden, inter, fused.act_fn, fused.gate_up_proj.dtype)
        with torch.no_grad():
            for e in range(num_experts):
                gate_up = fused.gate_up_proj[e]
                experts.gate_proj[e].weight = nn.Parameter(gate_up[:inter].clone(), requires_grad=False)
                experts.up_proj[e].weight = nn.Parameter(gate_up[inter:].clone(), requires_grad=False)
                experts.down_proj[e].weight = nn.Parameter(fused.down_proj[e].clone(), requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, experts)
    return len(names)
