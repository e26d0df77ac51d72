"""Two fused Triton kernels for the decode step, where every op is tiny and kernel count is time.

At batch 64 a decode step of a 24-layer model spends more time between kernels than in them: HF's
RMSNorm is ~7 elementwise kernels and the rotary embedding ~8 per layer. These kernels replace
them, reading the same parameters in place:
  add_rms_norm:  x += delta (the residual add), h = weight * rmsnorm(x), one program per row;
  rope_store:    (Qwen3: per-head q/k RMSNorm), rotary embedding of q and k, and the K/V write into
                 the cache at each row's position, one program per (row, head).
They round where HF's bf16 modules round (after the add, after normalising, after the weight), so
the engine in bf16 tracks HF in bf16. The eager path (model.py) is the reference they are tested
against; CPU runs that path unless tests force these kernels through the Triton interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl


@triton.jit
def _add_rms_norm_kernel(x_ptr, delta_ptr, w_ptr, out_ptr, R, N, eps, HAS_DELTA: tl.constexpr, SPLITS: tl.constexpr,
                         BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.prologue(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        d = tl.load(delta_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        if SPLITS > 1:  # float32 split-K partials of the projection: summed in order, rounded as its output
            for s in tl.static_range(1, SPLITS):
                d += tl.load(delta_ptr + (s * R + row) * N + cols, mask=mask, other=0.0)
            d = d.to(x_ptr.dtype.element_ty).to(tl.float32)
        x = (x + d).to(x_ptr.dtype.element_ty)  # the residual stream keeps its dtype, as x + o does in HF
        tl.store(x_ptr + row * N + cols, x, mask=mask)
        x = x.to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    normed = (x * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [R, N] (updated in place to x + delta when delta is given) -> weight * rmsnorm(x) [R, N].
    delta may also be float32 split-K partials [S, R, N] of a projection (skinny.linear's split_k)."""
    N = x.shape[-1]
    R = x.numel() // N
    assert x.is_contiguous() and (delta is None or delta.is_contiguous())
    splits = 1
    if delta is not None and delta.dim() == 3 and delta.shape[1:] == (R, N):
        splits = delta.shape[0]
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    _add_rms_norm_kernel[(R,)](x, delta if delta is not None else x, weight, out, R, N, eps,
                               HAS_DELTA=delta is not None, SPLITS=splits, BLOCK=triton.next_power_of_2(N),
                               **pdl.options(x.device))
    return out


@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, qo_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, kc_ptr, vc_ptr,
                       HQ, HKV, eps, stride_q, stride_k, stride_v, stride_cb, stride_ch, stride_cs,
                       D: tl.constexpr, HALF: tl.constexpr, HAS_NORM: tl.constexpr, PDL: tl.constexpr):
    pdl.prologue(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)  # 0..HQ-1: query heads; HQ..HQ+HKV-1: key/value heads
    pos = tl.load(pos_ptr + b)
    lo = tl.arange(0, HALF)
    c1 = tl.load(cos_ptr + pos * D + lo).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * D + HALF + lo).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * D + lo).to(tl.float32)  # sign-folded: rotate_half(x) * sin == roll(x) * s
    s2 = tl.load(sin_ptr + pos * D + HALF + lo).to(tl.float32)
    is_q = h < HQ
    kh = h - HQ
    if is_q:
        src = q_ptr + b * stride_q + h * D
        w_ptr = qw_ptr
    else:
        src = k_ptr + b * stride_k + kh * D
        w_ptr = kw_ptr
    x1 = tl.load(src + lo).to(tl.float32)
    x2 = tl.load(src + HALF + lo).to(tl.float32)
    if HAS_NORM:  # Qwen3's per-head RMSNorm, rounded where HF's module rounds
        var = (tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / D
        r = tl.rsqrt(var + eps)
        x1 = (x1 * r).to(q_ptr.dtype.element_ty).to(tl.float32)
        x2 = (x2 * r).to(q_ptr.dtype.element_ty).to(tl.float32)
        x1 = (tl.load(w_ptr + lo).to(tl.float32) * x1).to(q_ptr.dtype.element_ty).to(tl.float32)
        x2 = (tl.load(w_ptr + HALF + lo).to(tl.float32) * x2).to(q_ptr.dtype.element_ty).to(tl.float32)
    o1 = x1 * c1 + x2 * s1
    o2 = x2 * c2 + x1 * s2
    if is_q:
        dst_q = qo_ptr + (b * HQ + h) * D
        tl.store(dst_q + lo, o1.to(qo_ptr.dtype.element_ty))
        tl.store(dst_q + HALF + lo, o2.to(qo_ptr.dtype.element_ty))
    else:
        dst = (b * stride_cb + kh * stride_ch + pos * stride_cs)
        tl.store(kc_ptr + dst + lo, o1.to(kc_ptr.dtype.element_ty))
        tl.store(kc_ptr + dst + HALF + lo, o2.to(kc_ptr.dtype.element_ty))
        vsrc = v_ptr + b * stride_v + kh * D
        tl.store(vc_ptr + dst + lo, tl.load(vsrc + lo).to(vc_ptr.dtype.element_ty))
        tl.store(vc_ptr + dst + HALF + lo, tl.load(vsrc + HALF + lo).to(vc_ptr.dtype.element_ty))


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
               sin_signed: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               q_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """q [B, Hq*D], k/v [B, Hkv*D] (rows may be strided: slices of one fused q/k/v projection) ->
    roped q [B, Hq, D] (a new tensor), and roped k and v written at k/v_cache[b, :, positions[b]]
    (caches [rows, Hkv, S, D]). cos/sin_signed [S, D]. q_norm: (q weight [D], k weight [D], eps)
    for Qwen3's per-head norms."""
    B, D = q.shape[0], cos.shape[-1]
    HQ, HKV = q.shape[-1] // D, k.shape[-1] // D
    for x in (q, k, v):
        assert x.dim() == 2 and x.stride(1) == 1, "q/k/v must be [B, H*D] with unit stride along H*D"
    assert k_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    q_out = torch.empty((B, HQ, D), dtype=k_cache.dtype, device=q.device)
    qw, kw, eps = q_norm if q_norm is not None else (q, q, 0.0)
    _rope_store_kernel[(B, HQ + HKV)](
        q, k, v, q_out, positions, cos, sin_signed, qw, kw, k_cache, v_cache, HQ, HKV, eps,
        q.stride(0), k.stride(0), v.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        D=D, HALF=D // 2, HAS_NORM=q_norm is not None, **pdl.options(q.device))
    return q_out


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, N, stride, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.prologue(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(gu_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride + N + cols, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)  # HF rounds act_fn(gate) first
    tl.store(out_ptr + row * N + cols, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [R, 2N] (a fused gate/up projection) -> silu(gate) * up [R, N], one kernel."""
    R, N2 = gate_up.shape
    assert gate_up.stride(1) == 1 and N2 % 2 == 0
    N = N2 // 2
    out = torch.empty((R, N), dtype=gate_up.dtype, device=gate_up.device)
    BLOCK = 1024
    _silu_mul_kernel[(R, triton.cdiv(N, BLOCK))](gate_up, out, N, gate_up.stride(0), BLOCK=BLOCK,
                                                 **pdl.options(gate_up.device))
    return out

