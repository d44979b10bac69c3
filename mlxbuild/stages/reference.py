"""Reference logits: the eager model, quantized by the same scheme, run the way an
artifact is run (one prefill chunk, then single-token decode steps through a
static cache). Every target of the scheme is verified against these.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mlxbuild import llm
from mlxbuild.stages import quantize


def prompt_tokens(vocab_size: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, n), generator=g)


def run(params: dict, cache, out: Path) -> dict:
    model = llm.load_model(cache.path("weights", params["weights"]), params["dtype"])
    quantize.load_into(model, cache.path("quantize", params["quantized"]))
    exportable = llm.make_exportable(model, params["max_context_length"]).eval()
    vocab = llm.text_config(model).get("vocab_size") or params.get("vocab_size", 2)
    tokens = prompt_tokens(vocab, params["prompt"], params["seed"])
    logits, fed = [], [tokens]
    with torch.no_grad():
        step = exportable(input_ids=tokens, cache_position=torch.arange(tokens.shape[1]))
        logits.append(step[0].float())
        pos = tokens.shape[1]
        for _ in range(params["decode_steps"]):
            nxt = step[0, -1].argmax().view(1, 1)
            fed.append(nxt)
            step = exportable(input_ids=nxt, cache_position=torch.tensor([pos]))
            logits.append(step[0].float())
            pos += 1
    np.save(out / "tokens.npy", torch.cat(fed, dim=1).numpy())
    np.save(out / "logits.npy", torch.cat(logits, dim=0).numpy())
    (out / "reference.json").write_text(json.dumps({"prompt": params["prompt"],
                                                    "decode_steps": params["decode_steps"]}))
    return {"positions": int(sum(x.shape[0] for x in logits))}
