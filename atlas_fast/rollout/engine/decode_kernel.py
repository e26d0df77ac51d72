"""Decode attention in Triton: one query token per row against that row's own valid KV only.

SDPA over the cache needs a static span for CUDA graphs, so every row reads up to the longest row's
length rounded up (prompts of 30-256 tokens: ~1.6x the KV bytes a step must read). This kernel
reads positions 0..pos[b] of row b and nothing else, so one graph per batch bucket serves every
length. Split-K ("flash-decoding"): grid (rows, KV heads, splits); each program runs an online
softmax over its slice of the row's keys for the G query heads that share the KV head, then a
second kernel merges the splits. GQA costs no KV copy: the G heads are the rows of one tl.dot.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # keys per inner iteration
# Programs to aim for: 4 per SM. On an H200 (132 SMs) the first version's fixed 256-key splits
# (384 programs at batch 64) read the KV cache at ~1.8 TB/s; fewer keys per program means a shorter
# serial online-softmax chain per program.
PROGRAMS_PER_SM = 4
SPLIT_TOKENS: int | None = None  # fixed keys per split (tests); None: from the grid target above


def _splits(rows: int, kv_heads: int, length: int, device: torch.device) -> tuple[int, int]:
    """(number of splits, keys per split, a multiple of BLOCK_N) for a cache of `length` positions."""
    if SPLIT_TOKENS is not None:
        return triton.cdiv(length, SPLIT_TOKENS), SPLIT_TOKENS
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    want = max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, rows * kv_heads), triton.cdiv(length, BLOCK_N)))
    per = triton.cdiv(triton.cdiv(length, want), BLOCK_N) * BLOCK_N
    return triton.cdiv(length, per), per


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, m_ptr, l_ptr, scale, window,
                         stride_kb, stride_kh, stride_ks, HQ, G, NSPLIT, SPLIT,
                         D: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr, HAS_WINDOW: tl.constexpr,
                         PRECISION: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    pos = tl.load(pos_ptr + b)  # the query's position: keys 0..pos are visible
    lo = split * SPLIT
    hi = tl.minimum(lo + SPLIT, pos + 1)
    if HAS_WINDOW:
        lo = tl.maximum(lo, pos - window + 1)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    heads = kvh * G + g  # [GP]
    gmask = g < G
    q = tl.load(q_ptr + (b * HQ + heads)[:, None] * D + d[None, :], mask=gmask[:, None], other=0.0)  # [GP, D]
    m = tl.full([GP], float("-inf"), tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    base = b * stride_kb + kvh * stride_kh
    for start in range(lo, hi, BLOCK):
        n = start + tl.arange(0, BLOCK)
        nmask = n < hi
        offs = base + n[:, None] * stride_ks + d[None, :]
        k = tl.load(k_ptr + offs, mask=nmask[:, None], other=0.0)  # [BLOCK, D]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale  # [GP, BLOCK]
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + offs, mask=nmask[:, None], other=0.0)  # [BLOCK, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        m = m_new
    out = ((b * HQ + heads) * NSPLIT + split)  # [GP]
    tl.store(o_ptr + out[:, None] * D + d[None, :], acc, mask=gmask[:, None])
    tl.store(m_ptr + out, m, mask=gmask)
    tl.store(l_ptr + out, l, mask=gmask)


@triton.jit
def _decode_merge_kernel(o_ptr, m_ptr, l_ptr, out_ptr, NSPLIT, D: tl.constexpr, SP: tl.constexpr):
    row = tl.program_id(0)  # b * HQ + h
    s = tl.arange(0, SP)
    d = tl.arange(0, D)
    smask = s < NSPLIT
    m = tl.load(m_ptr + row * NSPLIT + s, mask=smask, other=float("-inf"))  # [SP]; empty splits are -inf
    l = tl.load(l_ptr + row * NSPLIT + s, mask=smask, other=0.0)
    m_all = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_all), 0.0)  # [SP]
    acc = tl.load(o_ptr + (row * NSPLIT + s)[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)  # [SP, D]
    o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + row * D + d, o.to(out_ptr.dtype.element_ty))


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                            scale: float, window: int | None) -> torch.Tensor:
    """q [B, Hq, D] at positions [B] against k/v_cache [rows >= B, Hkv, S, D] -> [B, Hq*D].
    Row b attends to its keys 0..positions[b] (within the window, if any)."""
    B, HQ, D = q.shape
    HKV, S = k_cache.shape[1], k_cache.shape[2]
    G = HQ // HKV
    assert q.is_contiguous() and k_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    nsplit, split = _splits(B, HKV, S, q.device)
    part = torch.empty((B, HQ, nsplit, D), dtype=torch.float32, device=q.device)
    m = torch.empty((B, HQ, nsplit), dtype=torch.float32, device=q.device)
    l = torch.empty((B, HQ, nsplit), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(B, HKV, nsplit)](
        q, k_cache, v_cache, positions, part, m, l, scale, window or 0,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), HQ, G, nsplit, split,
        D=D, GP=max(16, triton.next_power_of_2(G)), BLOCK=BLOCK_N, HAS_WINDOW=window is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32")  # float32 stays float32 (no TF32 rounding)
    out = torch.empty((B, HQ, D), dtype=q.dtype, device=q.device)
    _decode_merge_kernel[(B * HQ,)](part, m, l, out, nsplit, D=D, SP=triton.next_power_of_2(nsplit))
    return out.view(B, HQ * D)
