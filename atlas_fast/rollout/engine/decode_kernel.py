"""Decode attention in Triton: one query token per row against that row's own valid KV only.

SDPA over the cache needs a static span for CUDA graphs, so every row reads up to the longest row's
length rounded up (prompts of 30-256 tokens: ~1.6x the KV bytes a step must read). This kernel
reads positions 0..pos[b] of row b and nothing else, so one graph per batch bucket serves every
length. Split-K ("flash-decoding"): grid (rows, KV heads, splits); each program runs an online
softmax over its slice of the row's keys for the G query heads that share the KV head. GQA costs
no KV copy: the G heads are the rows of one tl.dot.

Two ways to merge the splits:
  * "two_kernel": every split writes its partial (acc, m, l), empty ones m=-inf, l=0; a second
    kernel merges them. At batch 64 on an H200 (Qwen2.5-0.5B shapes) the merge launch cost
    ~2.2 us per layer next to ~7.5 us for the splits.
  * "one_launch": only the splits that hold visible keys of their row run (the rest exit before
    touching memory); they write their partials and draw a ticket from a per-(row, KV head)
    counter; the program drawing the last ticket merges and writes the output, then puts the
    counter back to 0 for the next launch. A row whose visible keys fit in one split writes its
    output directly: no partial, no ticket.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import pdl

VARIANTS = ("two_kernel", "one_launch")
# The one-launch merge saved 1-6% per call on an H200 (bench_decode_attention.py: 10.7 vs 11.0 us
# at the 0.5B shape, 19.8 vs 21.0 us at 1.5B) and 4-6% of the 0.5B decode step with PDL
# (engine_variants.py: 1.045 vs 1.090 ms at 512 new tokens, 1.122 vs 1.198 at 1024).
VARIANT = "one_launch"
# Keys per inner iteration and pipeline depth, by head size; None: from `tiles`.
BLOCK_N: int | None = None
# Programs to aim for per SM. On an H200 (132 SMs) 2 per SM beat 4 and 8 at both benchmark shapes
# (11.0 vs 11.1 / 11.9 us at 0.5B, 21.0 vs 22.4 / 22.3 us at 1.5B); the first version's fixed
# 256-key splits read the KV cache at ~1.8 TB/s.
PROGRAMS_PER_SM = 2
NUM_WARPS = 4  # Triton's launch defaults, which the split kernel was tuned under
NUM_STAGES: int | None = None
SPLIT_TOKENS: int | None = None  # fixed keys per split (tests); None: from the grid target above

# One int32 ticket counter per (row, KV head), zero between launches (the merging program resets
# it). Kept here so CUDA graphs replay against the same live buffer: torch never frees or moves it.
_TICKETS: dict[tuple[str, int, int], torch.Tensor] = {}


def tiles(head_dim: int) -> tuple[int, int]:
    """(keys per inner iteration, pipeline stages) for a head size. On an H200 (one-launch merge, 2
    programs per SM, bench_decode_attention.py): head_dim 64 took 10.5 us with 128 keys x 2 stages
    against 12.5 with 64 x 3 (Qwen2.5-0.5B, 512 new tokens; 14.7 vs 17.3 at 1024); head_dim 128
    took 19.8 with 64 x 3 against 22.0 with 128 x 3 (Qwen2.5-1.5B)."""
    return (128, 2) if head_dim <= 64 else (64, 3)


def _splits(rows: int, kv_heads: int, length: int, device: torch.device, block_n: int,
            programs_per_sm: int = PROGRAMS_PER_SM, split_tokens: int | None = None) -> tuple[int, int]:
    """(number of splits, keys per split, a multiple of block_n) for a cache of `length` positions."""
    split_tokens = SPLIT_TOKENS if split_tokens is None else split_tokens
    if split_tokens is not None:
        return triton.cdiv(length, split_tokens), split_tokens
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    want = max(1, min(triton.cdiv(programs_per_sm * sms, rows * kv_heads), triton.cdiv(length, block_n)))
    per = triton.cdiv(triton.cdiv(length, want), block_n) * block_n
    return triton.cdiv(length, per), per


def tickets_for(device: torch.device, rows: int, kv_heads: int) -> torch.Tensor:
    """The zeroed ticket counters [rows * kv_heads] (int32) of the one-launch kernel on `device`.

    Created on first use and kept for the life of the process. Creation must happen outside CUDA
    graph capture (a zero fill captured into a graph would not run until that graph replays); the
    engine's warm-up step, run eagerly before each capture, is that first use. Launches that share
    the counters must not overlap in time (the engine runs its layers in order on one stream)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), rows, kv_heads)
    buf = _TICKETS.get(key)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"decode_attention_triton(variant='one_launch'): the ticket counters for {rows} rows x "
                f"{kv_heads} KV heads on {device} do not exist yet and cannot be created during CUDA graph "
                "capture; run the step once eagerly before capturing it, or pass tickets=")
        buf = torch.zeros(rows * kv_heads, dtype=torch.int32, device=device)
        _TICKETS[key] = buf
    return buf


def _upcast_dots(dtype: torch.dtype) -> bool:
    """The Triton interpreter multiplies 16-bit float dot operands as their raw uint16 bits (Triton
    3.7), so there they go in as float32: products of bf16/fp16 values are exact in float32, and p
    is still rounded to the cache dtype first, so only the summation order differs from the GPU."""
    return os.environ.get("TRITON_INTERPRET") == "1" and dtype in (torch.bfloat16, torch.float16)


@triton.jit
def _attend(q, k_ptr, v_ptr, base, lo, hi, stride_ks, scale,
            D: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
            UPCAST: tl.constexpr):
    """Online softmax of q [GP, D] over keys lo..hi-1 -> (m [GP], l [GP], acc [GP, D]), float32.
    An empty range gives m=-inf, l=0, acc=0."""
    d = tl.arange(0, D)
    if UPCAST:
        q = q.to(tl.float32)
    m = tl.full([GP], float("-inf"), tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for start in range(lo, hi, BLOCK):
        n = start + tl.arange(0, BLOCK)
        nmask = n < hi
        offs = base + n[:, None] * stride_ks + d[None, :]
        k = tl.load(k_ptr + offs, mask=nmask[:, None], other=0.0)  # [BLOCK, D]
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale  # [GP, BLOCK]
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + offs, mask=nmask[:, None], other=0.0)  # [BLOCK, D]
        pv = p.to(v.dtype)
        if UPCAST:
            pv = pv.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=PRECISION).to(tl.float32)
        m = m_new
    return m, l, acc


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, m_ptr, l_ptr, scale, window,
                         stride_kb, stride_kh, stride_ks, HQ, G, NSPLIT, SPLIT,
                         D: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr, HAS_WINDOW: tl.constexpr,
                         PRECISION: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr):
    pdl.prologue(PDL)
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
    m, l, acc = _attend(q, k_ptr, v_ptr, b * stride_kb + kvh * stride_kh, lo, hi, stride_ks, scale,
                        D, GP, BLOCK, PRECISION, UPCAST)
    out = ((b * HQ + heads) * NSPLIT + split)  # [GP]
    tl.store(o_ptr + out[:, None] * D + d[None, :], acc, mask=gmask[:, None])
    tl.store(m_ptr + out, m, mask=gmask)
    tl.store(l_ptr + out, l, mask=gmask)


@triton.jit
def _decode_merge_kernel(o_ptr, m_ptr, l_ptr, out_ptr, NSPLIT, D: tl.constexpr, SP: tl.constexpr, PDL: tl.constexpr):
    pdl.prologue(PDL)
    row = tl.program_id(0)  # b * HQ + h
    s = tl.arange(0, SP)
    d = tl.arange(0, D)
    smask = s < NSPLIT
    m = tl.load(m_ptr + row * NSPLIT + s, mask=smask, other=float("-inf"))  # [SP]; empty splits are -inf
    l = tl.load(l_ptr + row * NSPLIT + s, mask=smask, other=0.0)
    m_all = tl.max(m, axis=0)  # finite: key pos is visible, so at least one split is not empty
    w = tl.where(m > float("-inf"), tl.exp(m - m_all), 0.0)  # [SP]
    acc = tl.load(o_ptr + (row * NSPLIT + s)[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)  # [SP, D]
    o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + row * D + d, o.to(out_ptr.dtype.element_ty))


@triton.jit
def _decode_one_launch_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, o_ptr, m_ptr, l_ptr, ticket_ptr, scale, window,
                              stride_kb, stride_kh, stride_ks, HQ, HKV, G, NSPLIT, SPLIT,
                              D: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr, HAS_WINDOW: tl.constexpr,
                              PRECISION: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr):
    pdl.prologue(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    pos = tl.load(pos_ptr + b)  # the query's position: keys 0..pos are visible
    first_key = pos * 0
    if HAS_WINDOW:
        first_key = tl.maximum(pos - window + 1, 0)
    # Splits first..last hold this row's visible keys, each at least one: the number of tickets to
    # draw. The others (up to 3 of 4 at S=768 for a 100-token row) exit here and take no part in
    # the merge, so no -inf partial is ever written or read.
    first = first_key // SPLIT
    last = pos // SPLIT
    if (split >= first) & (split <= last):
        lo = tl.maximum(split * SPLIT, first_key)
        hi = tl.minimum(split * SPLIT + SPLIT, pos + 1)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        heads = kvh * G + g  # [GP]
        gmask = g < G
        q = tl.load(q_ptr + (b * HQ + heads)[:, None] * D + d[None, :], mask=gmask[:, None], other=0.0)  # [GP, D]
        m, l, acc = _attend(q, k_ptr, v_ptr, b * stride_kb + kvh * stride_kh, lo, hi, stride_ks, scale,
                            D, GP, BLOCK, PRECISION, UPCAST)
        out = out_ptr + (b * HQ + heads)[:, None] * D + d[None, :]
        if first == last:
            tl.store(out, (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=gmask[:, None])
        else:
            grp = b * HKV + kvh
            part = (grp * NSPLIT + split) * G + g  # [GP]: partials laid out [rows * HKV, NSPLIT, G(, D)]
            tl.store(o_ptr + part[:, None] * D + d[None, :], acc, mask=gmask[:, None])
            tl.store(m_ptr + part, m, mask=gmask)
            tl.store(l_ptr + part, l, mask=gmask)
            # Memory ordering. Writer side: the barrier orders every thread's partial stores above
            # before the one thread that issues the scalar atomic; that atomic is a gpu-scope
            # release, cumulative over what the barrier made visible to it, so the partials reach
            # L2 before the ticket does. Reader side: the drawer of the last ticket acquires every
            # earlier release through the counter's read-modify-write chain; Triton hands the
            # ticket to the other threads through shared memory behind a barrier, so their loads
            # below come after the acquire; they use .cg (L2, skipping this SM's L1, which is not
            # coherent across SMs and may hold a line shared with another row's partials).
            tl.debug_barrier()
            ticket = tl.atomic_add(ticket_ptr + grp, 1, sem="acq_rel", scope="gpu")
            if ticket == last - first:
                # Splits merge in index order whichever program drew the last ticket (its own partial
                # from registers: the same float32 values it stored), so the result is bitwise
                # the same from launch to launch.
                m_run = tl.full([GP], float("-inf"), tl.float32)
                l_run = tl.zeros([GP], tl.float32)
                acc_run = tl.zeros([GP, D], tl.float32)
                for s in range(first, last + 1):
                    if s == split:
                        m_s, l_s, acc_s = m, l, acc
                    else:
                        src = (grp * NSPLIT + s) * G + g
                        m_s = tl.load(m_ptr + src, mask=gmask, other=0.0, cache_modifier=".cg")
                        l_s = tl.load(l_ptr + src, mask=gmask, other=0.0, cache_modifier=".cg")
                        acc_s = tl.load(o_ptr + src[:, None] * D + d[None, :], mask=gmask[:, None], other=0.0,
                                        cache_modifier=".cg")
                    m_new = tl.maximum(m_run, m_s)  # finite: every counted split holds a visible key
                    a = tl.exp(m_run - m_new)  # 0 for the first split (m_run = -inf)
                    c = tl.exp(m_s - m_new)
                    acc_run = acc_run * a[:, None] + acc_s * c[:, None]
                    l_run = l_run * a + l_s * c
                    m_run = m_new
                tl.store(out, (acc_run / l_run[:, None]).to(out_ptr.dtype.element_ty), mask=gmask[:, None])
                # Every ticket of this launch is drawn: nobody else touches the counter until the
                # next launch, which stream order places after this one.
                tl.atomic_xchg(ticket_ptr + grp, 0, sem="relaxed", scope="gpu")


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                            scale: float, window: int | None, *, variant: str | None = None,
                            block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                            programs_per_sm: int | None = None, split_tokens: int | None = None,
                            tickets: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, D] at positions [B] against k/v_cache [rows >= B, Hkv, S, D] -> [B, Hq*D].
    Row b attends to its keys 0..positions[b] (within the window, if any).

    Keywords (None: the module default of the same name in capitals) choose the merge (`variant`,
    one of VARIANTS), keys per inner iteration (`block_n`, a power of two >= 16), the launch's
    num_warps / num_stages, the grid target (`programs_per_sm`) or fixed keys per split
    (`split_tokens`), and for "one_launch" the zeroed int32 counters [B * Hkv] to use (`tickets`,
    default `tickets_for(device, B, Hkv)`; they are zero again when the kernel ends)."""
    variant = VARIANT if variant is None else variant
    default_block, default_stages = tiles(q.shape[-1])
    block_n = block_n or BLOCK_N or default_block
    num_warps = NUM_WARPS if num_warps is None else num_warps
    num_stages = num_stages or NUM_STAGES or default_stages
    programs_per_sm = PROGRAMS_PER_SM if programs_per_sm is None else programs_per_sm
    if variant not in VARIANTS:
        raise ValueError(f"decode_attention_triton: variant must be one of {VARIANTS}, got {variant!r}")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"decode_attention_triton: block_n must be a power of two >= 16 (tl.dot), got {block_n}")
    B, HQ, D = q.shape
    HKV, S = k_cache.shape[1], k_cache.shape[2]
    G = HQ // HKV
    assert q.is_contiguous() and k_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    nsplit, split = _splits(B, HKV, S, q.device, block_n, programs_per_sm, split_tokens)
    GP = max(16, triton.next_power_of_2(G))
    upcast = _upcast_dots(q.dtype)
    precision = "ieee" if q.dtype == torch.float32 or upcast else "tf32"  # float32 stays float32 (no TF32 rounding)
    strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
    out = torch.empty((B, HQ, D), dtype=q.dtype, device=q.device)
    if variant == "two_kernel":
        part = torch.empty((B, HQ, nsplit, D), dtype=torch.float32, device=q.device)
        m = torch.empty((B, HQ, nsplit), dtype=torch.float32, device=q.device)
        l = torch.empty((B, HQ, nsplit), dtype=torch.float32, device=q.device)
        _decode_split_kernel[(B, HKV, nsplit)](
            q, k_cache, v_cache, positions, part, m, l, scale, window or 0, *strides, HQ, G, nsplit, split,
            D=D, GP=GP, BLOCK=block_n, HAS_WINDOW=window is not None, PRECISION=precision, UPCAST=upcast,
            num_warps=num_warps, num_stages=num_stages, **pdl.options(q.device))
        _decode_merge_kernel[(B * HQ,)](part, m, l, out, nsplit, D=D, SP=triton.next_power_of_2(nsplit),
                                        **pdl.options(q.device))
        return out.view(B, HQ * D)
    if tickets is None:
        tickets = tickets_for(q.device, B, HKV)
    elif tickets.dtype != torch.int32 or tickets.numel() < B * HKV or tickets.device != q.device:
        raise ValueError(f"decode_attention_triton: tickets must be int32 with >= {B * HKV} elements on "
                         f"{q.device}, got {tickets.dtype} x {tickets.numel()} on {tickets.device}")
    part = torch.empty((B * HKV, nsplit, G, D), dtype=torch.float32, device=q.device)
    m = torch.empty((B * HKV, nsplit, G), dtype=torch.float32, device=q.device)
    l = torch.empty((B * HKV, nsplit, G), dtype=torch.float32, device=q.device)
    _decode_one_launch_kernel[(B, HKV, nsplit)](
        q, k_cache, v_cache, positions, out, part, m, l, tickets, scale, window or 0, *strides, HQ, HKV, G, nsplit,
        split, D=D, GP=GP, BLOCK=block_n, HAS_WINDOW=window is not None, PRECISION=precision, UPCAST=upcast,
        num_warps=num_warps, num_stages=num_stages, **pdl.options(q.device))
    return out.view(B, HQ * D)
