"""The runner check of Whisper artifacts. ExecuTorch 1.5.1 has no Python binding of its ASR
runner, so ``transcribe`` follows ``Seq2SeqRunner::transcribe``
(``extension/asr/runner/seq2seq_runner.cpp``) call for call:

- ``encoder`` runs once, on features cast to the dtype its input declares;
- ``text_decoder`` then runs once per token: ``[[token]]`` (int64), the encoder output, and
  ``[cache_position]`` (int64), starting from the one ``decoder_start_token_id`` the app
  passes (the model itself predicts the language, task and timestamp tokens after it);
- the next token is the argmax of the last row of the single logits tensor it returns;
- it stops after a token of ``get_eos_ids`` (which overrides the tokenizer's EOS), or after
  ``max_new_tokens`` tokens. The runner does not bound that by the decoder's KV cache, so the
  check asks for ``get_max_context_len`` tokens, the most an app may ask for.

The eager side is computed the same way on the quantized model (the reference stage writes
it) and compared token for token, with the near-tie rule of the text runner check.
"""

from __future__ import annotations

import json
from pathlib import Path

RUNNER_FILE = "asr_runner.json"
ENCODER, DECODER = "encoder", "text_decoder"


def runner_reference(model, features, max_context_length: int, start: int, eos_ids) -> dict:
    """Eager greedy decoding from the decoder start token, as the runner decodes (a leaf:
    the family passes its start and EOS ids in)."""
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    start = int(start)
    eos = set(eos_ids or [])
    tokens, margins = [start], []
    with torch.no_grad():
        dtype = next(model.parameters()).dtype
        hidden = model.get_encoder()(input_features=torch.as_tensor(features).to(dtype)).last_hidden_state
        enc = BaseModelOutput(last_hidden_state=hidden)
        while len(tokens) - 1 < max_context_length:
            logits = model(encoder_outputs=enc, decoder_input_ids=torch.tensor([tokens]), use_cache=False).logits
            top = torch.topk(logits[0, -1].float(), 2)
            tokens.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            if tokens[-1] in eos:
                break
    return {"decoder_start_token_id": start, "eos_ids": sorted(eos), "max_new_tokens": max_context_length,
            "tokens": tokens[1:], "margins": margins}


def transcribe(program, features, decoder_start_token_id: int, eos_ids, max_new_tokens: int,
               dtype=None) -> list[int]:
    """``Seq2SeqRunner::transcribe`` at temperature 0 on an opened program: the tokens after
    the start token; ``dtype`` is the encoder input's (the runner casts to what the method
    declares). Raises ValueError where the runner would return an error."""
    import numpy as np
    import torch

    missing = {ENCODER, DECODER} - set(program.method_names)
    if missing:
        raise ValueError(f"Required methods not found: {', '.join(sorted(missing))}")
    if not eos_ids:
        raise ValueError("EOS token set must not be empty")
    for name in (ENCODER, DECODER):
        program.reset(name)
    feats = torch.as_tensor(np.asarray(features)).to(dtype or torch.float32)
    outputs = program.run(ENCODER, [feats])
    if len(outputs) != 1:
        raise ValueError(f"Encoder returned {len(outputs)} outputs; expected a single tensor")
    hidden = torch.as_tensor(np.asarray(outputs[0])) if not isinstance(outputs[0], torch.Tensor) else outputs[0]
    tokens, position = [int(decoder_start_token_id)], 0
    while len(tokens) - 1 < max_new_tokens:
        outputs = program.run(DECODER, [torch.tensor([[tokens[-1]]], dtype=torch.long), hidden,
                                        torch.tensor([position], dtype=torch.long)])
        if len(outputs) != 1:
            raise ValueError(f"Decoder returned {len(outputs)} outputs; expected a single tensor")
        logits = np.asarray(outputs[0], dtype=np.float32)
        if logits.size == 0:
            raise ValueError("Decoder logits tensor is empty")
        # logits_to_token: the last row of a [1, T, V] tensor (or the only one of [1, V]).
        row = logits.reshape(-1, logits.shape[-1])[-1]
        tokens.append(int(row.argmax()))
        position += 1
        if tokens[-1] in set(eos_ids):
            break
    return tokens[1:]


def compare(got: list[int], reference_dir: Path, max_abs_error: float) -> dict:
    """The runner loop's tokens against eager's, with the text runner check's near-tie rule."""
    ref = json.loads((Path(reference_dir) / RUNNER_FILE).read_text())
    want, margins = ref["tokens"], ref["margins"]
    figures = {"decoder_start_token_id": ref["decoder_start_token_id"], "max_new_tokens": ref["max_new_tokens"],
               "new_tokens": len(got), "expected_new_tokens": len(want)}
    from mlxbuild.families.common import first_parting

    parted = first_parting(got, want, margins, max_abs_error, "the ASR runner")
    if parted is not None:
        return {**figures, **parted}
    if len(got) != len(want):
        return {**figures, "passed": False, "matched": min(len(got), len(want)),
                "reason": f"the ASR runner decoded {len(got)} tokens, eager greedy {len(want)} "
                          f"(to EOS or max_new_tokens {ref['max_new_tokens']})"}
    return {**figures, "passed": True, "matched": len(want)}
