"""Rotary embedding and attention for prefill (causal, over the prompt) and decode (one query
token per row, over the KV cache). PyTorch SDPA only: flash-attn is never needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RopeTable:
    """cos and sign-folded sin per position: rotate_half(x) * sin == roll(x, half) * sin_signed,
    one roll instead of two slices, a negation and a concatenation (same values bit for bit)."""

    cos: torch.Tensor  # [S, rot]
    sin_signed: torch.Tensor  # [S, rot]

    @classmethod
    def build(cls, cos: torch.Tensor, sin: torch.Tensor) -> "RopeTable":
        half = cos.shape[-1] // 2
        sign = torch.ones(cos.shape[-1], dtype=sin.dtype, device=sin.device)
        sign[:half] = -1
        return cls(cos.contiguous(), (sin * sign).contiguous())

    @property
    def length(self) -> int:
        return self.cos.shape[0]

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin_signed [B, T, rot]."""
        return self.cos[positions], self.sin_signed[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D], cos/sin [B, T, 1, rot] -> x with its first `rot` dims rotated (HF's convention)."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + torch.roll(x, rot // 2, dims=-1) * sin_signed
    xr = x[..., :rot]  # partial rotary: the tail passes through
    return torch.cat((xr * cos + torch.roll(xr, rot // 2, dims=-1) * sin_signed, x[..., rot:]), -1)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      window: int | None) -> torch.Tensor:
    """q [P, T, Hq, D], k/v [P, T, Hkv, D], prompts right-padded -> [P, T, Hq*D].

    Right padding keeps a plain causal mask exact for every real token: pad tokens come after
    them, so no real query ever sees one; what the pads themselves compute is never read."""
    P, T, Hq, D = q.shape
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [P, H, T, D]
    if window is None or window >= T:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=Hq != k.shape[1])
    else:
        i = torch.arange(T, device=q.device)
        allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)  # [T, T]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=Hq != k.shape[1])
    return out.transpose(1, 2).reshape(P, T, Hq * D)


def decode_mask(positions: torch.Tensor, span: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """positions [B] (of the token being decoded) -> additive mask [B, 1, 1, span]: key j is
    visible when j <= pos (and pos - j < window). Built once per step, shared by every layer."""
    j = torch.arange(span, device=positions.device)
    visible = j[None, :] <= positions[:, None]  # [B, span]
    if window is not None:
        visible &= positions[:, None] - j[None, :] < window
    zero = torch.zeros((), dtype=dtype, device=positions.device)
    return torch.where(visible, zero, torch.finfo(dtype).min)[:, None, None, :]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """q [B, Hq, D] against k/v_cache [B, Hkv, span, D] under mask [B, 1, 1, span] -> [B, Hq*D].

    The G = Hq/Hkv query heads that share a KV head become G query rows of that head: one
    SDPA call with no KV expansion (HF's repeat_kv copies the whole cache G times)."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    q = q.view(B, Hkv, Hq // Hkv, D)  # head h reads KV head h // G, as HF's repeat_kv
    out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, scale=scale)  # [B, Hkv, G, D]
    return out.reshape(B, Hq * D)
