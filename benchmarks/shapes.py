"""Model shapes the benchmarks build with random weights (Qwen2.5 configs, tied embeddings)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


QWEN_05B = Shape("Qwen2.5-0.5B", 896, 24, 14, 2, 4864, 151936)
QWEN_15B = Shape("Qwen2.5-1.5B", 1536, 28, 12, 2, 8960, 151936)
