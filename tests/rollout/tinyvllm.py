"""The tiny model the vLLM tests serve (importable without pytest: the colocated run uses it too)."""
from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13], [20, 21, 22, 23]]  # ragged on purpose


def tiny_vllm_model(tokenizer, seed: int = 0) -> Qwen2ForCausalLM:
    """The smallest model vLLM's CPU attention takes: head_dim 32 (64 / 2 heads), 2 layers, a tied
    LM head as in Qwen2.5-0.5B (the case the weight push must get right on CPU)."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
