"""Tiny models built from configs (no downloads), shared by fixtures scripts, tests and benchmarks."""
from __future__ import annotations

import torch


def tiny_llama(seed: int = 0, layers: int = 2):
    """A 2-layer Llama with 64-wide hidden states; deterministic for a given seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()
