"""A decoder over embeddings, the piece every encoder-fed family shares: ExecuTorch's
multimodal layout (``token_embedding(token_ids) -> embeds``, ``text_decoder(input_embeds,
cache_position) -> logits``) with the export flavour's KV cache, built from a transformers
sub-model (a language model, or an encoder with a KV cache of its own) and transformers'
static-cache wrapper, so each flavour installs its cache exactly as it does for the text
families. Imports torch.
"""

from __future__ import annotations

import torch
from torch import nn


class AsCausalLM(nn.Module):
    """A sub-model presented as transformers' static-cache wrapper wants a causal LM (a
    config, a generation config, a dtype), taking embeddings; ``head`` (the LM head) and
    ``extra`` (keyword arguments of every call, as buffers: Voxtral Realtime's time
    conditioning) are optional."""

    def __init__(self, config, body, dtype, head=None, extra: dict | None = None):
        from transformers import GenerationConfig

        super().__init__()
        self.config, self.body, self.head, self._dtype = config, body, head, dtype
        self.generation_config = GenerationConfig(use_cache=True, cache_implementation="static")
        self._extra = sorted(extra or {})
        for name, value in (extra or {}).items():
            self.register_buffer(name, value, persistent=False)

    @property
    def dtype(self):
        return self._dtype

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, past_key_values=None,
                use_cache=True, **kwargs):
        from transformers.modeling_outputs import CausalLMOutput

        extra = {name: getattr(self, name) for name in self._extra}
        h = self.body(inputs_embeds=inputs_embeds, past_key_values=past_key_values, use_cache=True,
                      **extra).last_hidden_state
        return CausalLMOutput(logits=h if self.head is None else self.head(h))


def cached(view: AsCausalLM, flavour, max_len: int, chunk: int):
    """``view`` behind the flavour's static KV cache of ``max_len`` positions, written at most
    ``chunk`` at a time (sliding-window layers: a ring where the flavour has one)."""
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    exportable = TorchExportableModuleWithStaticCache(view, batch_size=1, max_cache_len=max_len)
    window = getattr(view.config, "sliding_window", None)
    sliding = frozenset(range(view.config.num_hidden_layers)) if window else frozenset()
    flavour.install_cache(exportable, view.config, max_len, chunk, view.dtype, sliding=sliding)
    return exportable


class TokenEmbedding(nn.Module):
    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, token_ids):
        return self.embed(token_ids)


class TextDecoder(nn.Module):
    """``text_decoder(input_embeds[1, T, D], cache_position[T]) -> logits[1, T, V]``."""

    def __init__(self, exportable):
        super().__init__()
        self.text = exportable

    def forward(self, input_embeds, cache_position):
        return self.text(inputs_embeds=input_embeds, cache_position=cache_position)


def decoder_modules(text_config, language_model, lm_head, dtype, flavour, params: dict, extra=None) -> dict:
    """``token_embedding`` and ``text_decoder`` of a language model and its head."""
    view = AsCausalLM(text_config, language_model, dtype, lm_head, extra)
    exportable = cached(view, flavour, params["max_context_length"], params["max_prefill_chunk"])
    return {"token_embedding": TokenEmbedding(language_model.embed_tokens).eval(),
            "text_decoder": TextDecoder(exportable).eval()}


def decoder_examples(hidden: int, dtype, max_prefill_chunk: int) -> dict:
    """Per method: (example kwargs, dynamic shapes); lengths dynamic up to the prefill chunk."""
    n = min(2, max_prefill_chunk)
    tokens = {"token_ids": torch.zeros(1, n, dtype=torch.long)}
    dec = {"input_embeds": torch.zeros(1, n, hidden, dtype=dtype), "cache_position": torch.arange(n)}
    if max_prefill_chunk == 1:
        return {"token_embedding": (tokens, None), "text_decoder": (dec, None)}
    tok = torch.export.Dim("tokens", min=1, max=max_prefill_chunk)
    seq = torch.export.Dim("seq_len", min=1, max=max_prefill_chunk)
    return {"token_embedding": (tokens, {"token_ids": {1: tok}}),
            "text_decoder": (dec, {"input_embeds": {1: seq}, "cache_position": {0: seq}})}
