"""Skinny GEMMs of the decode step in Triton, each with the op after it fused into the epilogue.

At batch 64 a projection reads 1.6-17 MB of weights and computes almost nothing; on an H200 the
cuBLAS kernels ran at 0.5-2.5 TB/s, and the rotary/KV-write and SiLU-mul that follow each cost a
launch of their own. Here one program owns a block of output columns for every row of the batch,
streams its weight slice once, and finishes the job in registers:
  qkv_rope_store:  x @ Wqkv^T + b, (Qwen3: per-head RMSNorm,) rotary embedding, q out and K/V into
                   the cache at each row's position; a program per head or per part of one, the two
                   rotary halves as two accumulators (so no register shuffles are needed to rotate);
  gate_up_silu:    silu(x @ Wg^T) * (x @ Wu^T), gate and up columns as two accumulators;
  linear:          x @ W^T (+ b), for o_proj, and split-K for down_proj (float32 partials that the
                   next add_rms_norm sums).
They round where HF's bf16 modules round (the projection's output, the activation, the product), so
their outputs match the cuBLAS path they replace up to the order of the fp32 accumulation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl


# Per-kernel launch settings (BLOCK_N, BLOCK_K, num_warps, num_stages[, BLOCK_M]): the fastest on an
# H200 at batch 64 and the Qwen2.5-0.5B shape (benchmarks/bench_decode_step.py): o_proj 3.6 us
# against cuBLAS's 4.5, q/k/v + rotary + KV write 6.0 against 7.5.
LINEAR_CONFIG = (16, 128, 4, 4)
# gate/up: 3 stages, and half-width column blocks once the weight passes GATE_UP_WIDE_BYTES (twice
# the programs to stream it). H200, batch 64, 512 new tokens (engine_variants.py), whole decode
# step: 0.5B (17 MB gate/up) 0.952 ms against 0.961 with 4 stages and 0.973 with 32 columns; 1.5B
# (55 MB) 1.915 ms with 32 columns against 1.964 with 64 (3 stages) and 1.970 (4 stages).
GATE_UP_CONFIG = (64, 128, 4, 3)
GATE_UP_LARGE_CONFIG = (32, 128, 4, 3)
GATE_UP_WIDE_BYTES = 32 * 2**20
QKV_CONFIG = (16, 128, 4, 4)  # BLOCK_N: rotary pairs per program (0: a whole head)
MAX_ROWS = 64  # rows per program; more rows take more programs along the second grid axis
# Measured at batch 64 only; each further 64 rows re-read the weights, so bigger batches (prefill-
# sized) go to cuBLAS.
MAX_BATCH = 128
# o_proj through the skinny kernel only when its weight is at most this: on the H200 it beat cuBLAS
# at 1.6 MB (Qwen2.5-0.5B, 3.5 vs 4.5 us) and lost at 4.7 MB and above.
LINEAR_MAX_BYTES = 2 * 2**20


# down_proj (K = the MLP width) in 4 K-slices whose float32 partials the next add_rms_norm sums:
# on an H200 the 0.5B decode step went from 1.146 to 1.097 ms (splits of 2: 1.122, of 8: 1.161;
# benchmarks/engine_variants.py). Unsplit, the skinny kernel lost to cuBLAS on down_proj (10.4 vs
# 8.7 us at 0.5B, 16.9 vs 12.3 at 1.5B), so larger weights than the one measured stay on cuBLAS.
DOWN_SPLIT = 4
DOWN_CONFIG = (16, 128, 4, 4)
DOWN_MAX_BYTES = 16 * 2**20
# o_proj in 2 K-slices, summed by the post-attention add_rms_norm the same way: projection + norm
# took 4.15 us against 6.48 for cuBLAS + norm at 0.5B and 6.16 against 7.61 at 1.5B (H200,
# bench_decode_step.py); unsplit, the skinny o_proj + norm was ~5 us at 0.5B and lost at 1.5B.
O_SPLIT = 2
O_CONFIG = (16, 128, 4, 4)
O_MAX_BYTES = 8 * 2**20
ENABLED = True  # False: every projection through cuBLAS (benchmark A/B)


def skinny_fits(x: torch.Tensor, weight: torch.Tensor, head_dim: int | None) -> bool:
    """Whether the skinny kernels take this projection: same dtype in and out of the GEMM, a decode-
    sized batch, and (for q/k/v) rotary halves of at least 16 columns, tl.dot's smallest tile."""
    if not ENABLED or x.dtype != weight.dtype or x.shape[0] > MAX_BATCH or x.stride(-1) != 1:
        return False
    return head_dim is None or (head_dim >= 32 and head_dim & (head_dim - 1) == 0)


def _split(x: torch.Tensor, weight: torch.Tensor, split: int, max_bytes: int) -> int:
    small = weight.numel() * weight.element_size() <= max_bytes
    return split if split > 1 and small and skinny_fits(x, weight, None) else 0


def down_split(x: torch.Tensor, weight: torch.Tensor) -> int:
    """Split-K slices for down_proj through the skinny kernel, or 0 for cuBLAS."""
    return _split(x, weight, DOWN_SPLIT, DOWN_MAX_BYTES)


def o_split(x: torch.Tensor, weight: torch.Tensor) -> int:
    """Split-K slices for o_proj through the skinny kernel, or 0 (unsplit skinny or cuBLAS)."""
    return _split(x, weight, O_SPLIT, O_MAX_BYTES)


def linear_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether an unsplit projection goes through the skinny kernel rather than cuBLAS."""
    return weight.numel() * weight.element_size() <= LINEAR_MAX_BYTES and skinny_fits(x, weight, None)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # float32 stays float32 (tests, the CPU path)


def _block_m(M: int, config: tuple) -> int:
    """Rows per program: the config's fifth entry if it has one (fewer rows per program, more
    programs, each streaming less of x), else all rows up to MAX_ROWS; tl.dot needs 16 at least."""
    most = config[4] if len(config) > 4 else MAX_ROWS
    return min(most, max(16, triton.next_power_of_2(M)))


@triton.jit
def _linear_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, K_SPLIT, stride_xm, stride_wn, stride_om,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                   PARTIAL: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    pdl.prologue(PDL)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = rm < M, rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < k_hi
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    omask = mmask[:, None] & nmask[None, :]
    if PARTIAL:  # float32 partial sums [splits, M, N]: their reader adds them in a fixed order
        tl.store(out_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :], acc, mask=omask)
    else:
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           config: tuple[int, int, int, int] | None = None, split_k: int = 1) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias [N]) -> [M, N] in x's dtype; with split_k > 1 the K range
    is cut over that many programs per output tile, which return float32 partial sums
    [split_k, M, N] for their reader to add (add_rms_norm does, in a fixed order: deterministic,
    unlike atomics). A long-K projection (down_proj) gets enough programs to stream its weight."""
    M, K = x.shape
    N = weight.shape[0]
    assert x.stride(1) == 1 and weight.stride(1) == 1 and weight.shape[1] == K and split_k >= 1
    config = config or LINEAR_CONFIG
    BN, BK, warps, stages = config[:4]
    BM = _block_m(M, config)
    BK = min(BK, max(16, triton.next_power_of_2(K)))
    k_split = triton.cdiv(triton.cdiv(K, split_k), BK) * BK
    split_k = triton.cdiv(K, k_split)
    if split_k > 1:
        out = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device)
    else:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    _linear_kernel[(triton.cdiv(N, BN), triton.cdiv(M, BM), split_k)](
        x, weight, bias if bias is not None else weight, out, M, N, K, k_split, x.stride(0), weight.stride(0), N,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, HAS_BIAS=bias is not None, PARTIAL=split_k > 1,
        PRECISION=_precision(x.dtype), num_warps=warps, num_stages=stages, **pdl.options(x.device))
    return out


@triton.jit
def _gate_up_silu_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, I, K, stride_xm, stride_wn,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    pdl.prologue(PDL)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # gate rows rn, up rows I + rn of the packed weight
    mmask, nmask = rm < M, rn < I
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        wmask = nmask[:, None] & kmask[None, :]
        wg = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=wmask, other=0.0)
        wu = tl.load(w_ptr + (I + rn)[:, None] * stride_wn + rk[None, :], mask=wmask, other=0.0)
        acc_g += tl.dot(x, tl.trans(wg), input_precision=PRECISION)
        acc_u += tl.dot(x, tl.trans(wu), input_precision=PRECISION)
    if HAS_BIAS:
        acc_g += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b_ptr + I + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    dtype = out_ptr.dtype.element_ty
    g = acc_g.to(dtype).to(tl.float32)  # HF rounds each projection's output, then act_fn(gate), then the product
    u = acc_u.to(dtype).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(out_ptr + rm[:, None] * I + rn[None, :], (act * u).to(dtype), mask=mmask[:, None] & nmask[None, :])


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K], weight [2I, K] (gate rows, then up rows) -> silu(x @ Wg^T) * (x @ Wu^T) [M, I]."""
    M, K = x.shape
    I = weight.shape[0] // 2
    assert x.stride(1) == 1 and weight.stride(1) == 1 and weight.shape == (2 * I, K)
    config = config or (GATE_UP_CONFIG if weight.numel() * weight.element_size() <= GATE_UP_WIDE_BYTES
                        else GATE_UP_LARGE_CONFIG)
    BN, BK, warps, stages = config[:4]
    BM = _block_m(M, config)
    out = torch.empty((M, I), dtype=x.dtype, device=x.device)
    _gate_up_silu_kernel[(triton.cdiv(I, BN), triton.cdiv(M, BM))](
        x, weight, bias if bias is not None else weight, out, M, I, K, x.stride(0), weight.stride(0),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=min(BK, max(16, triton.next_power_of_2(K))), HAS_BIAS=bias is not None,
        PRECISION=_precision(x.dtype), num_warps=warps, num_stages=stages, **pdl.options(x.device))
    return out


@triton.jit
def _qkv_rope_store_kernel(x_ptr, w_ptr, b_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, qo_ptr, kc_ptr, vc_ptr,
                           M, K, HQ, HKV, qk_eps, stride_xm, stride_wn, stride_cb, stride_ch, stride_cs,
                           D: tl.constexpr, HALF: tl.constexpr, PAIRS: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_QK_NORM: tl.constexpr,
                           PRECISION: tl.constexpr, PDL: tl.constexpr):
    pdl.prologue(PDL)
    pid = tl.program_id(0)
    pid_m = tl.program_id(1)
    SPLITS: tl.constexpr = HALF // PAIRS
    h = pid // SPLITS  # 0..HQ-1: query heads; then HKV key heads; then HKV value heads
    j = (pid % SPLITS) * PAIRS + tl.arange(0, PAIRS)  # this program's rotary pairs (j, j + HALF) of head h
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < M
    lo_rows = h * D + j  # rows of the packed [(HQ + 2 HKV) * D, K] weight
    hi_rows = lo_rows + HALF
    dtype = x_ptr.dtype.element_ty
    acc_lo = tl.zeros([BLOCK_M, PAIRS], tl.float32)
    acc_hi = tl.zeros([BLOCK_M, PAIRS], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        w_lo = tl.load(w_ptr + lo_rows[:, None] * stride_wn + rk[None, :], mask=kmask[None, :], other=0.0)
        w_hi = tl.load(w_ptr + hi_rows[:, None] * stride_wn + rk[None, :], mask=kmask[None, :], other=0.0)
        acc_lo += tl.dot(x, tl.trans(w_lo), input_precision=PRECISION)
        acc_hi += tl.dot(x, tl.trans(w_hi), input_precision=PRECISION)
    if HAS_BIAS:
        acc_lo += tl.load(b_ptr + lo_rows).to(tl.float32)[None, :]
        acc_hi += tl.load(b_ptr + hi_rows).to(tl.float32)[None, :]
    x1 = acc_lo.to(dtype).to(tl.float32)  # the projection's output, rounded as HF's module returns it
    x2 = acc_hi.to(dtype).to(tl.float32)
    pos = tl.load(pos_ptr + rm, mask=mmask, other=0)
    cache_at = rm[:, None] * stride_cb + pos[:, None] * stride_cs + j[None, :]  # [BLOCK_M, PAIRS] + head offset
    smask = mmask[:, None]
    if h < HQ + HKV:
        if HAS_QK_NORM:  # Qwen3's per-head RMSNorm (a program then holds the whole head: PAIRS == HALF)
            if h < HQ:
                hw_ptr = qw_ptr
            else:
                hw_ptr = kw_ptr
            r = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + qk_eps)[:, None]
            x1 = (x1 * r).to(dtype).to(tl.float32)
            x2 = (x2 * r).to(dtype).to(tl.float32)
            x1 = (tl.load(hw_ptr + j).to(tl.float32)[None, :] * x1).to(dtype).to(tl.float32)
            x2 = (tl.load(hw_ptr + HALF + j).to(tl.float32)[None, :] * x2).to(dtype).to(tl.float32)
        rope_at = pos[:, None] * D + j[None, :]
        c1 = tl.load(cos_ptr + rope_at).to(tl.float32)
        c2 = tl.load(cos_ptr + rope_at + HALF).to(tl.float32)
        s1 = tl.load(sin_ptr + rope_at).to(tl.float32)  # sign-folded: rotate_half(x) * sin == roll(x) * s
        s2 = tl.load(sin_ptr + rope_at + HALF).to(tl.float32)
        o1 = x1 * c1 + x2 * s1
        o2 = x2 * c2 + x1 * s2
        if h < HQ:
            q_at = (rm[:, None] * HQ + h) * D + j[None, :]
            tl.store(qo_ptr + q_at, o1.to(qo_ptr.dtype.element_ty), mask=smask)
            tl.store(qo_ptr + q_at + HALF, o2.to(qo_ptr.dtype.element_ty), mask=smask)
        else:
            at = cache_at + (h - HQ) * stride_ch
            tl.store(kc_ptr + at, o1.to(kc_ptr.dtype.element_ty), mask=smask)
            tl.store(kc_ptr + at + HALF, o2.to(kc_ptr.dtype.element_ty), mask=smask)
    else:
        at = cache_at + (h - HQ - HKV) * stride_ch
        tl.store(vc_ptr + at, x1.to(vc_ptr.dtype.element_ty), mask=smask)
        tl.store(vc_ptr + at + HALF, x2.to(vc_ptr.dtype.element_ty), mask=smask)


def qkv_rope_store(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor,
                   cos: torch.Tensor, sin_signed: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   num_heads: int, q_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
                   config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K], weight [(Hq + 2 Hkv) * D, K] (q, k, v rows packed) -> roped q [M, Hq, D]; roped k and
    v are written at k/v_cache[m, :, positions[m]] (caches [rows, Hkv, S, D]). cos/sin_signed [S, D].
    q_norm: Qwen3's per-head (q weight, k weight, eps).
    config[0]: rotary pairs per program (0: a whole head), more programs for a small projection."""
    M, K = x.shape
    D = cos.shape[-1]
    HKV = k_cache.shape[1]
    HQ = num_heads
    assert weight.shape == ((HQ + 2 * HKV) * D, K) and x.stride(1) == 1 and weight.stride(1) == 1
    assert k_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    config = config or QKV_CONFIG
    pairs, BK, warps, stages = config[:4]
    half = D // 2
    pairs = half if pairs <= 0 or q_norm is not None else min(max(16, pairs), half)
    assert half % pairs == 0
    BM = _block_m(M, config)
    q_out = torch.empty((M, HQ, D), dtype=k_cache.dtype, device=x.device)
    qw, kw, qk_eps = q_norm if q_norm is not None else (weight, weight, 0.0)
    _qkv_rope_store_kernel[((HQ + 2 * HKV) * (half // pairs), triton.cdiv(M, BM))](
        x, weight, bias if bias is not None else weight, positions, cos, sin_signed, qw, kw, q_out, k_cache, v_cache,
        M, K, HQ, HKV, qk_eps, x.stride(0), weight.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        D=D, HALF=half, PAIRS=pairs, BLOCK_M=BM, BLOCK_K=min(BK, max(16, triton.next_power_of_2(K))),
        HAS_BIAS=bias is not None, HAS_QK_NORM=q_norm is not None, PRECISION=_precision(x.dtype), num_warps=warps,
        num_stages=stages, **pdl.options(x.device))
    return q_out
