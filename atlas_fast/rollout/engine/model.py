"""The decoder forward, written over the HF model's own submodules.

We call the embedding, the q/k/v/o projections, the q/k norms, the layer norms, the MLP and the
LM head as modules, so whatever wraps them (PEFT LoRA layers, autocast) applies exactly as in
training, and an optimizer step is visible at the next decode step with nothing copied. What we
write ourselves is what HF's forward would do through its cache object: rotary embedding,
attention over our KV cache, and the residual wiring of the four supported families, which share
one layer layout (pre-norm attention + pre-norm gated MLP; Qwen3 adds per-head q/k RMSNorm).

Two decode steps: `decode_logits` (PyTorch ops and module calls: the CPU path and the reference)
and `decode_logits_fused` (CUDA): the stock RMSNorms computed from their weights by a Triton kernel,
plain q/k/v and gate/up layers through packed copies (packed.py); LoRA-wrapped layers are still
called as modules there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...fused_layers import plain_rms_norm
from .attention import RopeTable, apply_rope, decode_attention, decode_mask, prefill_attention
from .cache import KVCache

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")


@dataclass
class Decoder:
    """Handles on the HF modules of one decoder-only model, resolved once."""

    model_type: str
    embed: nn.Module
    layers: list[nn.Module]
    norm: nn.Module
    lm_head: nn.Module
    rotary: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    windows: list[int | None]  # per layer: sliding window (keys with q_pos - k_pos < w), or None
    vocab_size: int
    plain_norms: bool  # every norm is the family's stock RMSNorm: the fused decode kernels may compute it

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def resolve_decoder(model: nn.Module) -> Decoder:
    """Find the submodules of a Llama / Qwen2 / Qwen3 / Mistral causal LM (PEFT-wrapped or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: LoRA injected in place
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", type(base).__name__)
    if model_type not in SUPPORTED:
        raise NotImplementedError(
            f"the engine rollout backend supports model types {SUPPORTED}, not {model_type!r}; "
            f"use rollout_backend='hf' for this model")
    inner = getattr(base, "model", None)
    lm_head = getattr(base, "lm_head", None)
    parts = [getattr(inner, name, None) for name in ("embed_tokens", "layers", "norm", "rotary_emb")]
    if inner is None or lm_head is None or any(p is None for p in parts):
        raise NotImplementedError(f"{model_type!r} model {type(base).__name__} lacks the usual "
                                  "model.embed_tokens/layers/norm/rotary_emb + lm_head layout; use rollout_backend='hf'")
    embed, layers, norm, rotary = parts
    attn = layers[0].self_attn
    for i, layer in enumerate(layers):
        for name in ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn"):
            if not hasattr(layer, name):
                raise NotImplementedError(f"{model_type!r} layer {i} has no {name}; use rollout_backend='hf'")
    if getattr(config, "attn_logit_softcapping", None) or getattr(config, "final_logit_softcapping", None):
        raise NotImplementedError(f"{model_type!r} with logit soft-capping is not supported; use rollout_backend='hf'")
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    return Decoder(
        model_type=model_type, embed=embed, layers=list(layers), norm=norm, lm_head=lm_head, rotary=rotary,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=attn.head_dim, scaling=float(attn.scaling),
        windows=[_window(config, layer.self_attn) for layer in layers], vocab_size=config.vocab_size,
        plain_norms=all(plain_rms_norm(m) for m in _norms(layers, norm)),
    )


def _norms(layers, final: nn.Module) -> list[nn.Module]:
    out = [final]
    for layer in layers:
        out += [layer.input_layernorm, layer.post_attention_layernorm]
        out += [getattr(layer.self_attn, name) for name in ("q_norm", "k_norm") if hasattr(layer.self_attn, name)]
    return out


def _window(config, attn: nn.Module) -> int | None:
    # Qwen2/Qwen3 mark sliding layers on the module (`layer_types`); Mistral applies the config's
    # window to every layer.
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window or None
    return getattr(config, "sliding_window", None) or None


# An attention callback: (layer index, q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, D]) -> [B, T, Hq*D]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def run_layers(dec: Decoder, ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
    """ids [B, T], cos/sin [B, T, rot] -> final-normed hidden states [B, T, H]."""
    x = dec.embed(ids)  # [B, T, H]
    B, T = ids.shape
    cos, sin = cos[:, :, None], sin[:, :, None]  # [B, T, 1, rot]: broadcast over heads
    for i, layer in enumerate(dec.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(B, T, dec.num_heads, dec.head_dim)  # [B, T, Hq, D]
        k = attn.k_proj(h).view(B, T, dec.num_kv_heads, dec.head_dim)  # [B, T, Hkv, D]
        v = attn.v_proj(h).view(B, T, dec.num_kv_heads, dec.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before the rotary embedding
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Under autocast a float32 q/k norm weight or rope table promotes q/k; the cache holds v's dtype.
        o = attend(i, q.to(v.dtype), k.to(v.dtype), v)  # [B, T, Hq*D]
        x = x + attn.o_proj(o)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return dec.norm(x)


def rope_table(dec: Decoder, length: int, dtype: torch.dtype, device: torch.device) -> RopeTable:
    """cos/sin for positions 0..length-1 from the model's own rotary module (so scaled ropes,
    llama3 / yarn / linear, come out as HF computes them)."""
    positions = torch.arange(length, device=device)[None]  # [1, S]
    probe = torch.zeros((), dtype=dtype, device=device)
    cos, sin = dec.rotary(probe, positions)  # [1, S, rot]
    return RopeTable.build(cos[0].to(dtype), sin[0].to(dtype))


def prefill_logits(dec: Decoder, cache: KVCache, rope: RopeTable, ids: torch.Tensor, lengths: torch.Tensor,
                   dest: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Prompts ids [P, T] (right-padded, true lengths [P]) -> next-token logits [P, V]; their KV
    goes to cache rows `dest` [M] from prompt `src` [M] (each prompt computed once, shared by its n rows)."""
    P, T = ids.shape
    positions = torch.arange(T, device=ids.device)[None].expand(P, T)  # [P, T]
    cos, sin = rope.lookup(positions)  # [P, T, rot]

    def attend(i: int, q, k, v):
        cache.fan_out(i, dest, src, k, v)
        return prefill_attention(q, k, v, dec.scaling, dec.windows[i])

    h = run_layers(dec, ids, cos, sin, attend)  # [P, T, H]
    last = h[torch.arange(P, device=ids.device), lengths - 1]  # [P, H]: only the last token needs logits
    return dec.lm_head(last)


def decode_logits(dec: Decoder, cache: KVCache, rope: RopeTable, tokens: torch.Tensor, positions: torch.Tensor,
                  span: int) -> torch.Tensor:
    """One step for cache rows 0..B-1: tokens [B] at positions [B] -> next-token logits [B, V].
    Attention reads positions < span only; static shapes, so it can be captured in a CUDA graph."""
    B = tokens.shape[0]
    cos, sin = rope.lookup(positions[:, None])  # [B, 1, rot]
    dtype = cache.buf.dtype
    masks = {w: decode_mask(positions, span, w, dtype) for w in set(dec.windows)}  # [B, 1, 1, span]

    def attend(i: int, q, k, v):
        cache.write_token(i, positions, k[:, 0], v[:, 0])  # k/v [B, Hkv, D]
        out = decode_attention(q[:, 0], cache.keys(i)[:B, :, :span], cache.values(i)[:B, :, :span],
                               masks[dec.windows[i]], dec.scaling)  # [B, Hq*D]
        return out[:, None]

    h = run_layers(dec, tokens[:, None], cos, sin, attend)  # [B, 1, H]
    return dec.lm_head(h[:, 0])  # [B, V]


def fusable(dec: Decoder, rope: RopeTable) -> bool:
    """Whether the fused decode kernels apply: stock RMSNorms, full rotary, a power-of-two head_dim."""
    D = dec.head_dim
    return dec.plain_norms and rope.cos.shape[-1] == D and D >= 16 and D & (D - 1) == 0


def decode_logits_fused(dec: Decoder, cache: KVCache, rope: RopeTable, tokens: torch.Tensor, positions: torch.Tensor,
                        span: int, triton_attention: bool = True, packed=None) -> torch.Tensor:
    """`decode_logits` with the norms, rotary embedding and KV write in fused kernels (kernels.py);
    with `triton_attention`, attention that reads each row's own KV length (decode_kernel.py;
    `span` is then ignored); with `packed` (packed.py), one GEMM for q/k/v and one for gate/up
    where those layers are plain nn.Linear, run by the skinny Triton kernels (skinny.py) that also
    apply the rotary/KV write or SiLU-mul after them, and o_proj and down_proj split-K with their
    partial sums added by the next norm: 7 kernels per layer (norm, q/k/v, attention, o_proj, norm,
    gate/up, down) where HF's forward launches about 40."""
    from .decode_kernel import decode_attention_triton
    from .kernels import add_rms_norm, rope_store, silu_mul
    from . import skinny
    from .skinny import gate_up_silu, qkv_rope_store, skinny_fits
    from .skinny import linear as skinny_linear

    B = tokens.shape[0]
    dtype = cache.buf.dtype
    masks = {} if triton_attention else {w: decode_mask(positions, span, w, dtype) for w in set(dec.windows)}
    x = dec.embed(tokens).contiguous()  # [B, H]: the residual stream, updated in place by add_rms_norm
    delta = None  # the previous layer's MLP output, added to x by the next norm
    for i, layer in enumerate(dec.layers):
        attn, mlp = layer.self_attn, layer.mlp
        pk = packed.layers[i] if packed is not None else None
        norm_in, norm_post = layer.input_layernorm, layer.post_attention_layernorm
        qk_norm = (attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.variance_epsilon) if hasattr(attn, "q_norm") else None
        h = add_rms_norm(x, delta, norm_in.weight, norm_in.variance_epsilon)  # [B, H]
        if pk is not None and pk.qkv is not None and skinny_fits(h, pk.qkv.weight, dec.head_dim):
            q = qkv_rope_store(h, pk.qkv.weight, pk.qkv.bias, positions, rope.cos, rope.sin_signed, cache.keys(i),
                               cache.values(i), dec.num_heads, qk_norm)  # [B, Hq, D]; K/V now in the cache
        else:
            if pk is not None and pk.qkv is not None:
                q, k, v = F.linear(h, pk.qkv.weight, pk.qkv.bias).split(pk.qkv.splits, -1)  # strided [B, H*D] views
            else:
                q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)  # [B, Hq*D], [B, Hkv*D] x 2
            q = rope_store(q.to(dtype), k.to(dtype), v.to(dtype), positions, rope.cos, rope.sin_signed,
                           cache.keys(i), cache.values(i), qk_norm)  # [B, Hq, D]; K/V now in the cache
        if triton_attention:
            o = decode_attention_triton(q, cache.keys(i), cache.values(i), positions, dec.scaling, dec.windows[i])
        else:
            o = decode_attention(q, cache.keys(i)[:B, :, :span], cache.values(i)[:B, :, :span],
                                 masks[dec.windows[i]], dec.scaling)  # [B, Hq*D]
        split = skinny.o_split(o, pk.o.weight) if pk is not None and pk.o is not None else 0
        if split:  # float32 split-K partials [S, B, H]: the next add_rms_norm sums them
            o = skinny.linear(o, pk.o.weight, pk.o.bias, skinny.O_CONFIG, split)
        elif pk is not None and pk.o is not None and skinny.linear_fits(o, pk.o.weight):
            o = skinny_linear(o, pk.o.weight, pk.o.bias)
        else:
            o = attn.o_proj(o).contiguous()
        h = add_rms_norm(x, o, norm_post.weight, norm_post.variance_epsilon)
        if pk is not None and pk.gate_up is not None:
            if skinny_fits(h, pk.gate_up.weight, None):
                act = gate_up_silu(h, pk.gate_up.weight, pk.gate_up.bias)  # [B, I]
            else:
                act = silu_mul(F.linear(h, pk.gate_up.weight, pk.gate_up.bias))
            split = skinny.down_split(act, pk.down.weight) if pk.down is not None else 0
            if split:  # float32 split-K partials [S, B, H]: the next add_rms_norm sums them
                delta = skinny.linear(act, pk.down.weight, pk.down.bias, skinny.DOWN_CONFIG, split)
            else:
                delta = mlp.down_proj(act).contiguous()
        else:
            delta = mlp(h).contiguous()
    h = add_rms_norm(x, delta, dec.norm.weight, dec.norm.variance_epsilon)
    return dec.lm_head(h)  # [B, V]
