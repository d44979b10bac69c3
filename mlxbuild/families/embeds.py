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


def text_ids(model) -> dict:
    """A composite model's decoder facts the runners read: vocabulary, BOS, EOS, width."""
    text = model.config.text_config
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else text.eos_token_id
    bos = gen.bos_token_id if gen.bos_token_id is not None else text.bos_token_id
    return {"model_type": model.config.model_type, "vocab_size": text.vocab_size, "bos_token_id": bos,
            "eos_token_id": eos if isinstance(eos, list) or eos is None else [eos], "hidden_size": text.hidden_size}


def runner_constants(params: dict, fc: dict) -> dict:
    """The LLM runners' constant methods of a decoder over embeddings (``text_ids``'s facts)."""
    from mlxbuild.families.common import kv_cache_methods

    methods = {**kv_cache_methods(params), "get_vocab_size": fc["vocab_size"]}
    if fc.get("bos_token_id") is not None:
        methods["get_bos_id"] = fc["bos_token_id"]
        methods["get_prompt_prefix_ids"] = [fc["bos_token_id"]]
    if fc.get("eos_token_id"):
        methods["get_eos_ids"] = fc["eos_token_id"]
    return methods


def media_prompt(inputs: dict, encoder: str, placeholder: int, count: int, before, after) -> dict:
    """``inputs`` with the prompt ids (``count`` placeholders for the media between the text
    before and after it) and the runner's segments (the media's as ``[encoder, None]``)."""
    prompt = list(before) + [placeholder] * count + list(after)
    segments = ([["text", list(before)]] if before else []) + [[encoder, None]] + \
        ([["text", list(after)]] if after else [])
    return {**inputs, "prompt_ids": prompt, "segments": segments}


def seeded_text(fc: dict, n: int, seed: int, reserved) -> list[int]:
    """``n`` seeded token ids, none of them special (BOS, EOS, the media placeholder)."""
    g = torch.Generator().manual_seed(seed)
    special = {fc["bos_token_id"], *(fc["eos_token_id"] or []), *reserved}
    pool = [t for t in range(fc["vocab_size"]) if t not in special]
    return [pool[int(i)] for i in torch.randint(0, len(pool), (n,), generator=g)]


def eager_generate(model, prompt_ids: list[int], new_tokens: int, **media) -> list[int]:
    """transformers' greedy ``generate`` from ``prompt_ids`` with the media keyword arguments,
    exactly ``new_tokens`` tokens."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        # The mask is given: generate() would infer one from pad_token_id.
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=prompt_ids[0], **media)
    return out[0].tolist()


def logits_with_media(model, prompt_ids: list[int], ids: list[int], placeholder: int, features):
    """Every position's logits along ``ids``, ``features`` ([1, T, D]) at the prompt's
    placeholders only (a generated token may be the placeholder id; the runner feeds it as a
    token embedding)."""
    at = torch.tensor([i for i, t in enumerate(prompt_ids) if t == placeholder])
    with torch.no_grad():
        emb = model.get_input_embeddings()(torch.tensor([ids]))
        emb[0, at] = features.reshape(-1, emb.shape[-1]).to(emb.dtype)
        return model(inputs_embeds=emb).logits[0]
