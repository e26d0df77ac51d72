"""The KV cache: one preallocated buffer, a contiguous slab of positions per row.

A GRPO batch is a few prompts times G samples that all advance one token per step, so a row per
sequence with a fixed length is simpler than vLLM's paged blocks and wastes little: rows differ only
by their prompt length. The buffer is allocated once and reused by every `generate` call (grown only
when a call needs more), so CUDA graphs captured over it stay valid across calls.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    buf: torch.Tensor  # [L, 2, rows, Hkv, S, D]: keys at [:, 0], values at [:, 1]

    @classmethod
    def allocate(cls, layers: int, rows: int, kv_heads: int, length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> "KVCache":
        return cls(torch.zeros(layers, 2, rows, kv_heads, length, head_dim, dtype=dtype, device=device))

    @property
    def rows(self) -> int:
        return self.buf.shape[2]

    @property
    def length(self) -> int:
        return self.buf.shape[4]

    @property
    def nbytes(self) -> int:
        return self.buf.numel() * self.buf.element_size()

    def fits(self, rows: int, length: int, dtype: torch.dtype, device: torch.device) -> bool:
        return (self.rows >= rows and self.length >= length and self.buf.dtype == dtype
                and self.buf.device == device)

    def keys(self, layer: int) -> torch.Tensor:
        return self.buf[layer, 0]  # [rows, Hkv, S, D]

    def values(self, layer: int) -> torch.Tensor:
        return self.buf[layer, 1]

    def write_token(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Rows 0..B-1 store k/v [B, Hkv, D] at their own position [B] (a scatter: no host sync)."""
        B, H, D = k.shape
        index = positions.view(B, 1, 1, 1).expand(B, H, 1, D)
        self.keys(layer)[:B].scatter_(2, index, k[:, :, None])
        self.values(layer)[:B].scatter_(2, index, v[:, :, None])

    def fan_out(self, layer: int, dest: torch.Tensor, src: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Prefix sharing: the prefilled k/v [P, T, Hkv, D] of P prompts go to every cache row that
        samples from them, row dest[i] taking prompt src[i] (one gather per layer, no recompute)."""
        T = k.shape[1]
        self.keys(layer)[dest, :, :T] = k.transpose(1, 2)[src]
        self.values(layer)[dest, :, :T] = v.transpose(1, 2)[src]

    def compact(self, keep: torch.Tensor, span: int) -> None:
        """Rows `keep` [m] (ascending) move to rows 0..m-1; only positions < span are live.
        Layer by layer, so the temporary is one layer's live rows, not the whole cache."""
        m = keep.shape[0]
        for layer in range(self.buf.shape[0]):
            self.buf[layer, :, :m, :, :span] = self.buf[layer, :, keep, :, :span]
