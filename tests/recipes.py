"""Tiny synthetic-weights recipes shared by the tests that write checkpoints themselves;
each test picks the widths its quantization needs (group sizes divide them)."""

from __future__ import annotations


def whisper(d_model: int, seed: int = 0) -> dict:
    return {"architecture": "whisper", "seed": seed,
            "config": {"vocab_size": 64, "d_model": d_model, "encoder_layers": 2, "decoder_layers": 2,
                       "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
                       "decoder_ffn_dim": 64, "num_mel_bins": 16, "max_source_positions": 20,
                       "max_target_positions": 16, "decoder_start_token_id": 1, "bos_token_id": 1,
                       "eos_token_id": 2, "pad_token_id": 0, "begin_suppress_tokens": None,
                       "suppress_tokens": None}}


def qwen3_moe(moe_intermediate_size: int, seed: int = 0) -> dict:
    return {"architecture": "qwen3_moe", "seed": seed,
            "config": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                       "moe_intermediate_size": moe_intermediate_size, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                       "num_experts": 4, "num_experts_per_tok": 2}}
