"""Tiny offline models of the four families the engine supports (hidden 64, 2 layers, head_dim 16).

initializer_range 0.3 (HF's default is 0.02): with near-zero weights a random model repeats one
token forever, and a greedy comparison that never branches proves little.
"""
from __future__ import annotations

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

ARCHS = ("llama", "qwen2", "qwen3", "mistral")


def tiny_decoder(arch: str, tokenizer, seed: int = 0, layers: int = 2, heads: tuple[int, int] = (4, 2)):
    """heads: (query heads, KV heads) over hidden 64: (4, 2) gives head_dim 16, (2, 1) head_dim 32."""
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=heads[0], num_key_value_heads=heads[1], max_position_embeddings=256,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                  initializer_range=0.3)
    if arch == "llama":  # a scaled rope: the engine must take cos/sin from the model's rotary module
        model_cls, cfg = LlamaForCausalLM, LlamaConfig(**common, rope_parameters=dict(
            rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64))
    elif arch == "qwen2":
        model_cls, cfg = Qwen2ForCausalLM, Qwen2Config(**common, tie_word_embeddings=True)
    elif arch == "qwen3":  # per-head q/k norms
        model_cls, cfg = Qwen3ForCausalLM, Qwen3Config(**common, head_dim=64 // heads[0])
    elif arch == "mistral":  # a sliding window shorter than the sequences
        model_cls, cfg = MistralForCausalLM, MistralConfig(**common, sliding_window=5)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Imported by the engine's test modules. Their decode steps are ~[16, 64] x [64, 96] matmuls:
    a second intra-op thread only adds synchronisation, and costs 10x in wall time when other
    processes share the two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
