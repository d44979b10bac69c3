"""Text-generation models as ExecuTorch wants them: a static KV cache and a
``forward(input_ids[1, T], cache_position[T]) -> logits[1, T, V]`` signature.

The Hugging Face side of every family: loading a materialized weights folder (MoE
experts unfused), the static-cache wrapper, example inputs. Imports torch.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The seq-len dim is traced at this example size and bounded by max_prefill_chunk.
EXAMPLE_SEQ = 3


def load_model(weights_dir: Path, dtype: str, attn_implementation: str | None = None):
    """Load the materialized weights entry (a Hugging Face folder or a module state)."""
    meta = json.loads((Path(weights_dir) / "source.json").read_text())
    if "module" in meta["load"]:
        from safetensors.torch import load_model as load_safetensors

        model = build_module(meta["load"])
        # save_model stored tied tensors once; load_model restores every name that shares them.
        load_safetensors(model, Path(weights_dir) / "model.safetensors", strict=True)
        return model.to(DTYPES[dtype]).eval()
    kwargs = {"dtype": DTYPES[dtype]}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = auto_model_class(weights_dir).from_pretrained(weights_dir, **kwargs)
    return prepare(model).eval()


def prepare(model):
    """What every step's model gets after loading, whether from_pretrained or streamed."""
    for accessor in ("get_input_embeddings", "get_output_embeddings"):
        try:
            getattr(model, accessor)()
        except NotImplementedError:
            # transformers raises for models without a text embedding to report (Parakeet's
            # transducer); the quantizer reads None as "no tied output head".
            setattr(model, accessor, lambda: None)
    # Fused 3-D experts become per-expert nn.Linear, so the scheme's linear rule
    # quantizes them and export can trace them (mlxbuild.families.moe).
    from mlxbuild.families.moe import unfuse_experts

    unfuse_experts(model)
    for module in model.modules():
        # padding_idx only zeroes gradients; in an exported graph it is an extra argument
        # that keeps ExecuTorch's quantized-embedding rewrite from matching (Gemma uses 0).
        if isinstance(module, torch.nn.Embedding):
            module.padding_idx = None
    return model


def auto_model_class(folder: Path):
    """The transformers auto class for a checkpoint folder, by its config's model_type:
    speech models have their own (Whisper seq2seq, Parakeet TDT), everything else is a causal LM."""
    import transformers

    from mlxbuild.families import auto_class_name

    config = Path(folder) / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    return getattr(transformers, auto_class_name(model_type))


def build_module(recipe: dict):
    module_name, _, attr = recipe["module"].partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    model = factory(**(recipe.get("kwargs") or {}))
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{recipe['module']} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def is_hf(model) -> bool:
    return hasattr(model, "config") and hasattr(model, "generation_config")


def make_exportable(model, max_context_length: int):
    """The eager model as the artifact is called, ``(input_ids, cache_position) -> logits``:
    an HF causal LM behind a static cache (a hybrid one behind transformers' own cache:
    ``gated_delta.EagerHybrid``); a user's own module as it is."""
    if is_hf(model):
        from mlxbuild.families import gated_delta

        if gated_delta.is_hybrid(model):
            return gated_delta.EagerHybrid(model)
    return static_exportable(model, max_context_length)


def static_exportable(model, max_context_length: int):
    """Wrap an HF causal LM with a static cache; a user's own module is used as-is."""
    if not is_hf(model):
        return model
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    model.generation_config.use_cache = True
    model.generation_config.cache_implementation = "static"
    model.generation_config.cache_config = {"batch_size": 1, "max_cache_len": max_context_length}
    return TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=max_context_length)


def example_inputs(max_prefill_chunk: int):
    n = min(EXAMPLE_SEQ, max_prefill_chunk)
    kwargs = {"input_ids": torch.zeros((1, n), dtype=torch.long),
              "cache_position": torch.arange(n, dtype=torch.long)}
    if max_prefill_chunk == 1:
        return kwargs, None
    seq = torch.export.Dim("seq_len", min=1, max=max_prefill_chunk)
    return kwargs, {"input_ids": {1: seq}, "cache_position": {0: seq}}


def text_config(model) -> dict:
    """vocab size and special ids the constant methods publish."""
    if not is_hf(model):
        # A user's module has no config: its input embedding tells the vocabulary, so
        # verification prompts span it (not just ids 0 and 1) and runners get get_vocab_size.
        emb = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
        return {} if emb is None else {"vocab_size": emb.num_embeddings}
    cfg = model.config.get_text_config()
    out = {"vocab_size": cfg.vocab_size}
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(model.generation_config, name, None) or getattr(cfg, name, None)
        if value is not None:
            out[name] = value
    return out


def sliding_layers(config) -> set[int]:
    """Indices of the layers that attend over a sliding window (Gemma 3's local layers)."""
    text = config.get_text_config()
    if getattr(text, "sliding_window", None) is None:
        return set()
    types = getattr(text, "layer_types", None) or ["sliding_attention"] * text.num_hidden_layers
    return {i for i, t in enumerate(types) if t == "sliding_attention"}


def check_prefill_chunk(config, max_prefill_chunk: int, max_context_length: int) -> None:
    """The manifest's runner-contract check (``mlxbuild.families.windows``) at export, for
    sources the manifest could not see into."""
    from mlxbuild.errors import BuildError
    from mlxbuild.families import windows

    problem = windows.runner_contract_problem(max_prefill_chunk, max_context_length)
    if problem:
        raise BuildError(f"export.max_prefill_chunk: {problem}")
