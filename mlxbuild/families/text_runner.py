"""The runner check of text-generation artifacts: what ExecuTorch's ``TextLLMRunner`` must
produce on an artifact, computed the runner's way on the eager model (the reference stage
writes it), and the comparison of the runner's output with it (the verify stage). Its own
module so that only the reference and verify steps hash it and the tokenizer code.
"""

from __future__ import annotations

import json
from pathlib import Path

RUNNER_FILE = "runner.json"


def applies(model) -> bool:
    """A transformers model (a user's module has no generation config to take EOS from)."""
    from mlxbuild.families import hf

    return hf.is_hf(model)


def runner_reference(model, params: dict, tokenizer_dir: Path) -> dict:
    """What ExecuTorch's TextLLMRunner must produce, computed the runner's way on the eager
    model: the corpus prompt as its tokenizer encodes it, prefilled, then greedy tokens up
    to the context limit (``max_new_tokens=-1`` resolves to context - prompt), stopping
    after an EOS (the first token, from the prefill, is not checked, as in the runner).
    Each token's top-1 margin is kept: a target may differ from eager only where the
    eager choice was a near tie."""
    import torch

    from mlxbuild import tokenizer
    from mlxbuild.families import common, hf

    ctx = params["max_context_length"]
    text, ids = tokenizer.runner_prompt(tokenizer_dir, params["runner_prompt"])
    eos = set(_eos_ids(model))
    exportable = hf.make_exportable(model, ctx).eval()
    tokens, margins = [], []
    # The prefill's output head sees only the last position: the runner reads only that row,
    # and the whole prompt's logits (~1000 x the vocabulary) would be the step's largest
    # allocation (0.3 GB in bf16 at Qwen3's 151,936 entries).
    last_row = model.get_output_embeddings().register_forward_pre_hook(
        lambda _module, args: (args[0][:, -1:], *args[1:]))

    def greedy():
        with torch.no_grad():
            try:
                logits = exportable(input_ids=torch.tensor([ids]), cache_position=torch.arange(len(ids)))[0, -1]
            finally:
                last_row.remove()
            for pos in range(len(ids), ctx):
                top = torch.topk(logits.float(), 2)
                tokens.append(int(top.indices[0]))
                margins.append(float(top.values[0] - top.values[1]))
                if (len(tokens) > 1 and tokens[-1] in eos) or pos + 1 == ctx:
                    break
                logits = exportable(input_ids=torch.tensor([[tokens[-1]]]), cache_position=torch.tensor([pos]))[0, -1]

    # one whole-model pass a token: torchao's forwards' arithmetic, with less of their work
    common.leanly(model, greedy)
    return {"prompt": text, "prompt_ids": ids, "prompt_tokens": len(ids), "tokens": tokens,
            "margins": margins, "new_tokens": len(tokens),
            "pieces": tokenizer.pieces(tokenizer_dir, tokens)}


def _eos_ids(model) -> list[int]:
    from mlxbuild.families import hf

    eos = hf.text_config(model).get("eos_token_id")
    return [] if eos is None else eos if isinstance(eos, list) else [eos]


def compare_runner(pieces: list[str], reference_dir: Path, max_abs_error: float) -> dict:
    """The runner's pieces against the eager continuation, token for token. They may part
    only at a near tie of the eager model (top-1 margin within twice the artifact's largest
    logit error, as ``common.compare`` counts decisive positions); after that the two
    continue from different tokens and are not compared."""
    ref = json.loads((Path(reference_dir) / RUNNER_FILE).read_text())
    want, margins = ref["pieces"], ref["margins"]
    figures = {"prompt_tokens": ref["prompt_tokens"], "new_tokens": len(pieces),
               "expected_new_tokens": len(want)}
    from mlxbuild.families.common import first_parting

    parted = first_parting(pieces, want, margins, max_abs_error, "TextLLMRunner")
    if parted is not None:
        return {**figures, **parted}
    if len(pieces) != len(want):
        return {**figures, "passed": False, "matched": min(len(pieces), len(want)),
                "reason": f"TextLLMRunner generated {len(pieces)} tokens after a {ref['prompt_tokens']}-token "
                          f"prompt, eager greedy {len(want)} (to the context limit or EOS)"}
    return {**figures, "passed": True, "matched": len(want)}


def bundled_case(reference_dir: Path, prompt: int):
    """The bundled program's test case: the verification prefill (its tokens and positions)
    and the eager logits of those positions, as [1, T, V] like ``forward`` returns them."""
    import numpy as np
    import torch

    tokens = np.load(Path(reference_dir) / "tokens.npy")[:, :prompt]
    logits = np.load(Path(reference_dir) / "logits.npy")[:prompt]
    # Fresh tensors: the bundled-program serializer refuses numpy views' strides.
    return ([torch.tensor(tokens.tolist(), dtype=torch.long), torch.arange(prompt, dtype=torch.long)],
            [torch.tensor(logits, dtype=torch.float32).reshape(1, *logits.shape).clone()])
