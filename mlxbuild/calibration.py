"""The float model over calibration tokens, with each named linear's input handed to a
callback: what GPTQ (its Hessians) and AWQ (its activation statistics) both observe."""

from __future__ import annotations

import torch


def feed(model, names: list[str], batches: torch.Tensor, on_input) -> None:
    """Run ``model`` on each row of ``batches`` [B, T]; ``on_input(name, x)`` gets every named
    linear's input as [tokens, in_features] float32."""
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: on_input(n, args[0].detach().reshape(-1, args[0].shape[-1]).float()))
        for n in names]
    try:
        with torch.no_grad():
            for row in batches:
                model(input_ids=row.view(1, -1), use_cache=False)
    finally:
        for h in handles:
            h.remove()
