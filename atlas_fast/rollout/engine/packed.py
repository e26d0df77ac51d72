"""Packed projections: q/k/v weights side by side in one matrix, gate/up in another.

At batch 64 a projection is a skinny [64, H] x [H, N] GEMM that costs a kernel launch and a
partly idle GPU more than its bytes: on an H200, q, k and v of Qwen2.5-0.5B took ~4 us each and the
gate/up pair ~5 us each, for 2 MB and 17 MB of weights. One GEMM over the packed weights reads the
same bytes in one launch. The packs are copies in the compute dtype (bf16 also saves the per-step
cast of float32 weights), so they are refreshed by `update_weights` (after every optimizer step)
and whenever a source's autograd version counter moved (in-place updates through autograd-visible
ops: optimizer steps, load_state_dict; writes through `.data` move none, hence the former). The
buffers are rewritten in place, so captured CUDA graphs stay valid. Only plain nn.Linear layers are packed:
a LoRA-wrapped projection is called as its module, so the adapter applies. o_proj and down_proj are
not copied: when already in the compute dtype they are handed to the skinny kernels as they are
(`alias`), since each is one matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...fused_layers import silu_activation
from .model import Decoder


@dataclass
class Pack:
    sources: list[nn.Linear]  # concatenated along the output dimension, in this order
    weight: torch.Tensor  # [sum of out_features, in_features]
    bias: torch.Tensor | None
    splits: list[int]  # out_features of each source
    alias: bool = False  # weight/bias are the one source's own tensors: nothing to copy

    def refresh(self) -> None:
        """Copy the sources into their rows (copy_ also casts float32 weights to the compute dtype)."""
        if self.alias:
            return
        with torch.no_grad():
            start = 0
            for m in self.sources:
                rows = slice(start, start + m.out_features)
                self.weight[rows].copy_(m.weight)
                if self.bias is not None:
                    self.bias[rows].copy_(m.bias)
                start += m.out_features


def _plain(m: nn.Module) -> bool:
    return type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks


def _pack(sources: list[nn.Module], dtype: torch.dtype) -> Pack | None:
    if not all(_plain(m) for m in sources):
        return None
    if len({m.bias is None for m in sources}) != 1 or len({m.in_features for m in sources}) != 1:
        return None
    w0 = sources[0].weight
    rows = sum(m.out_features for m in sources)
    weight = torch.empty((rows, w0.shape[1]), dtype=dtype, device=w0.device)
    bias = None if sources[0].bias is None else torch.empty(rows, dtype=dtype, device=w0.device)
    pack = Pack(list(sources), weight, bias, [m.out_features for m in sources])
    pack.refresh()
    return pack


def _alias(m: nn.Module, dtype: torch.dtype) -> Pack | None:
    """A plain layer already in the compute dtype: handed to the skinny kernels as it is (they
    decide by its size whether to take it)."""
    if not _plain(m) or m.weight.dtype != dtype:
        return None
    bias = m.bias.detach() if m.bias is not None else None
    return Pack([m], m.weight.detach(), bias, [m.out_features], alias=True)


@dataclass
class PackedLayer:
    qkv: Pack | None
    gate_up: Pack | None  # only with a SiLU MLP (the four families' `hidden_act="silu"`)
    o: Pack | None = None  # o_proj itself (skinny split-K or linear)
    down: Pack | None = None  # down_proj itself (skinny split-K)


class PackedWeights:
    def __init__(self, dec: Decoder, dtype: torch.dtype):
        self.layers: list[PackedLayer] = []
        for layer in dec.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = _pack([attn.q_proj, attn.k_proj, attn.v_proj], dtype)
            gate_up = None
            if silu_activation(mlp) and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
                gate_up = _pack([mlp.gate_proj, mlp.up_proj], dtype)
            down = _alias(mlp.down_proj, dtype) if gate_up is not None else None
            self.layers.append(PackedLayer(qkv, gate_up, _alias(attn.o_proj, dtype), down))
        self._stamp = self._versions()

    def _packs(self) -> list[Pack]:
        return [p for layer in self.layers for p in (layer.qkv, layer.gate_up, layer.o, layer.down) if p is not None]

    def _versions(self) -> tuple[int, ...]:
        return tuple(t._version for p in self._packs() for m in p.sources
                     for t in (m.weight, m.bias) if t is not None)

    def refresh(self) -> None:
        for p in self._packs():
            p.refresh()
        self._stamp = self._versions()

    def refresh_if_stale(self) -> bool:
        """Re-copy the packs if any source changed since the last copy (a host-side check)."""
        stamp = self._versions()
        if stamp == self._stamp:
            return False
        self.refresh()
        return True

    @property
    def nbytes(self) -> int:
        """Bytes of the copies (aliases cost nothing)."""
        return sum(p.weight.numel() * p.weight.element_size() for p in self._packs() if not p.alias)

    @property
    def count(self) -> int:
        return len(self._packs())

