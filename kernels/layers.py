"""The decoder layer's elementwise work in fused kernels, forward and backward: RMSNorm, SwiGLU and
the rotary position embedding of queries and keys.

In a training step of a small model over long sequences these are a visible share of the time: an
HF RMSNorm is ~6 kernels forward (cast, square, mean, rsqrt, two multiplies) and more in backward,
each a full pass over a [tokens, hidden] tensor; SiLU-mul is 2 forward and ~5 backward. Here each
is one pass forward and one backward, computed in float32 and rounded where the HF modules round,
so a patched model's outputs match the stock one's bit for bit in float32 and to bf16 rounding
otherwise.

  rms_norm(x, weight, eps) = weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype)      (last dim)
  silu_mul(gate, up)       = silu(gate).to(dtype) * up
  rope(q, k, cos, sin)     = (x * cos + rotate_half(x) * sin for x in (q, k))          (per head)

rms_norm saves only the per-row 1/rms (float32) for backward; silu_mul saves its inputs; rope saves
only cos and sin (the rotation's transpose needs nothing else). Each direction's launch is also a
function of its own (`rms_norm_forward` / `rms_norm_backward`, `silu_mul_*`, `rope_*`), for callers
that write a whole layer's backward themselves (atlas_fast/fused_decoder.py). HF's rotary embedding is 5 kernels per
tensor forward (rotate_half's negation and concatenation, two products, a sum) and about twice that
backward; rope is one kernel each way for queries and keys together, reading cos and sin once per
token.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import TRITON_DTYPES, next_pow2, use_triton

ELEMENTWISE_BLOCK = 1024
# Programs of the RMSNorm backward: each owns a run of rows and one float32 partial of d(weight),
# summed afterwards: 4 per SM keeps the partials small ([programs, H]) and every SM busy.
NORM_BWD_PROGRAMS_PER_SM = 4


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, H, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x_raw = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0)
    x = x_raw.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
    xh = (x * rstd).to(x_raw.dtype).to(tl.float32)  # the module rounds to the input dtype before the weight
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * H + cols, (w * xh).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(x_ptr, w_ptr, rstd_ptr, dy_ptr, dx_ptr, dw_ptr, R, H, ROWS_PER_PROGRAM,
                         BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], tl.float32)
    first = pid * ROWS_PER_PROGRAM
    for r in range(first, tl.minimum(first + ROWS_PER_PROGRAM, R)):
        row = tl.full([], 0, tl.int64) + r  # 64-bit offsets (r is a plain int in the interpreter)
        x_raw = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0)
        x = x_raw.to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        dy = tl.load(dy_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        xhat = x * rstd
        dw += dy * xhat.to(x_raw.dtype).to(tl.float32)
        # d/dx of x * rstd(x), the rounding to the input dtype taken as the identity
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / H))
        tl.store(dx_ptr + row * H + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + pid.to(tl.int64) * H + cols, dw, mask=mask)


def rms_norm_forward(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward launch on rows x2 [R, H] (contiguous): the output and each row's 1/rms (float32)."""
    R, H = x2.shape
    y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x2.dtype), device=x2.device)
    rstd = torch.empty(R, dtype=torch.float32, device=x2.device)
    if R:
        _rms_norm_fwd_kernel[(R,)](x2, weight.contiguous(), y, rstd, H, eps, BLOCK=next_pow2(H), num_warps=_warps(H))
    return y, rstd


def rms_norm_backward(x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor,
                      weight_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """d(x2) and (with `weight_grad`) d(weight) from the forward's rows, weight, 1/rms and d(output)."""
    R, H = x2.shape
    dx = torch.empty_like(x2)
    sms = _sm_count(x2.device.index if x2.device.index is not None else torch.cuda.current_device()) if x2.is_cuda else 4
    programs = max(1, min(R, NORM_BWD_PROGRAMS_PER_SM * sms))
    per = triton.cdiv(R, programs) if R else 1
    programs = triton.cdiv(R, per) if R else 1
    partial = torch.zeros((programs, H), dtype=torch.float32, device=x2.device)
    if R:
        _rms_norm_bwd_kernel[(programs,)](x2, weight.contiguous(), rstd, dy.reshape(-1, H).contiguous(), dx,
                                          partial, R, H, per, BLOCK=next_pow2(H), num_warps=_warps(H))
    return dx, partial.sum(0).to(weight.dtype) if weight_grad else None


class RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y, rstd = rms_norm_forward(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(x2, weight, rstd, dy, weight_grad=ctx.needs_input_grad[1])
        return dx.view(ctx.shape), dw, None


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:  # asked once per GPU, not at every launch
    return torch.cuda.get_device_properties(index).multi_processor_count


def _warps(H: int) -> int:
    return 4 if H <= 2048 else 8 if H <= 8192 else 16


@triton.jit
def _silu_mul_fwd_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g_raw = tl.load(g_ptr + offs, mask=mask, other=0.0)
    g = g_raw.to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(g_raw.dtype).to(tl.float32)  # silu's output is rounded, then multiplied
    tl.store(y_ptr + offs, (act * u).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_bwd_kernel(g_ptr, u_ptr, dy_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g_raw = tl.load(g_ptr + offs, mask=mask, other=0.0)
    g = g_raw.to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    act = (g * s).to(g_raw.dtype).to(tl.float32)
    tl.store(du_ptr + offs, (dy * act).to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=mask)


def silu_mul_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The forward launch on contiguous gate and up of one shape."""
    y = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    n = gate.numel()
    if n:
        _silu_mul_fwd_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](gate, up, y, n, BLOCK=ELEMENTWISE_BLOCK)
    return y


def silu_mul_backward(gate: torch.Tensor, up: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d(gate), d(up) from the forward's (contiguous) inputs and d(output)."""
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _silu_mul_bwd_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](gate, up, dy.contiguous(), dg, du, n,
                                                                   BLOCK=ELEMENTWISE_BLOCK)
    return dg, du


class SiLUMulFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g, u = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(g, u)
        return silu_mul_forward(g, u)

    @staticmethod
    def backward(ctx, dy):
        return silu_mul_backward(*ctx.saved_tensors, dy)


# Elements of one half-head tile that a rope program rotates at once: 16 heads of a 128-dim head
# (64 per half) in one step, 8 elements per thread of the default 4 warps; more heads loop.
ROPE_TILE = 1024
# Each product and sum rounded on its own, as PyTorch's elementwise ops round them (see _rope_heads).
ROPE_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _rope_heads(x_ptr, y_ptr, x_row, y_row, sxh, sxd, syh, syd, H, HALF, c1, c2, s1, s2,
                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None].to(tl.int64)
    cols = tl.arange(0, BLOCK_D)[None, :].to(tl.int64)
    ty = y_ptr.dtype.element_ty
    for h0 in range(0, H, BLOCK_H):
        h = h0 + heads
        mask = (h < H) & (cols < HALF)
        xp = x_ptr + x_row + h * sxh + cols * sxd
        x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xp + HALF * sxd, mask=mask, other=0.0).to(tl.float32)
        # PyTorch rounds x * cos and rotate_half(x) * sin each to the output dtype, then adds them
        # and rounds again: so do we. The casts alone do not hold the compiler to that: LLVM sees
        # through the float32 round trip, narrows both steps to bf16 and fuses them into one
        # fma.rn.bf16 (the product unrounded: ~22% of outputs 1 ulp off HF's). The launch turns
        # floating-point fusion off (ROPE_OPTIONS), which leaves mul.rn and add.rn, PyTorch's bits.
        y1 = (x1 * c1).to(ty).to(tl.float32) - (x2 * s1).to(ty).to(tl.float32)
        y2 = (x2 * c2).to(ty).to(tl.float32) + (x1 * s2).to(ty).to(tl.float32)
        yp = y_ptr + y_row + h * syh + cols * syd
        tl.store(yp, y1.to(ty), mask=mask)
        tl.store(yp + HALF * syd, y2.to(ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, T, Hq, Hkv, HALF, cos_sb,
                 sqb, sqh, sqt, sqd, skb, skh, skt, skd, sob, soh, sot, sod, spb, sph, spt, spd,
                 BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one token of one sequence: all its query and key heads
    b = row // T
    t = row % T
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < HALF
    c_row = b * cos_sb + t * (2 * HALF)
    # cos and sin in full: HF builds their halves equal, but the formula reads both, so do we
    c1 = tl.load(cos_ptr + c_row + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + c_row + HALF + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + c_row + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + c_row + HALF + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if BACKWARD:
        # the rotation's transpose: sin's halves trade places and sign. Each term is rounded to
        # the gradient's dtype before the sum, as autograd accumulates the two paths' gradients.
        s1, s2 = -s2, -s1
    _rope_heads(q_ptr, qo_ptr, b * sqb + t * sqt, b * sob + t * sot, sqh, sqd, soh, sod, Hq, HALF,
                c1, c2, s1, s2, BLOCK_H, BLOCK_D)
    _rope_heads(k_ptr, ko_ptr, b * skb + t * skt, b * spb + t * spt, skh, skd, sph, spd, Hkv, HALF,
                c1, c2, s1, s2, BLOCK_H, BLOCK_D)


def _rope_launch(q, k, qo, ko, cos, sin, backward: bool) -> None:
    B, Hq, T, D = q.shape
    if not (B * T) or not (Hq + k.shape[1]):
        return
    block_d = next_pow2(D // 2)
    block_h = min(next_pow2(max(Hq, k.shape[1])), max(1, ROPE_TILE // block_d))
    cos_sb = 0 if cos.shape[0] == 1 else T * D  # one table for every sequence when position ids are shared
    _rope_kernel[(B * T,)](q, k, qo, ko, cos, sin, T, Hq, k.shape[1], D // 2, cos_sb, *q.stride(), *k.stride(),
                           *qo.stride(), *ko.stride(), BACKWARD=backward, BLOCK_H=block_h, BLOCK_D=block_d,
                           **ROPE_OPTIONS)


def rope_forward(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward launch (cos and sin contiguous): rotated q and k, each in its input's memory
    order. The model's q is a transposed view of [B, T, H, D]; its output (and gradient) stay in
    that order, as PyTorch's elementwise ops leave them."""
    table = torch.promote_types(cos.dtype, sin.dtype)
    qo = torch.empty_like(q, dtype=torch.promote_types(q.dtype, table))
    ko = torch.empty_like(k, dtype=torch.promote_types(k.dtype, table))
    _rope_launch(q, k, qo, ko, cos, sin, backward=False)
    return qo, ko


def rope_backward(dqo: torch.Tensor, dko: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  layouts: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """d(q), d(k) from the outputs' gradients; `layouts` is ((stride, dtype) of the forward's q
    output, the same of k's): the gradients come back in the memory order of the outputs."""
    (q_stride, q_dtype), (k_stride, k_dtype) = layouts
    dq = torch.empty_strided(dqo.shape, q_stride, dtype=q_dtype, device=dqo.device)
    dk = torch.empty_strided(dko.shape, k_stride, dtype=k_dtype, device=dko.device)
    _rope_launch(dqo, dko, dq, dk, cos, sin, backward=True)
    return dq, dk


class RoPEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        cos, sin = cos.contiguous(), sin.contiguous()  # [B or 1, T, D]: 1/H of q's size
        qo, ko = rope_forward(q, k, cos, sin)
        ctx.save_for_backward(cos, sin)
        ctx.layouts = (qo.stride(), q.dtype), (ko.stride(), k.dtype)
        return qo, ko

    @staticmethod
    def backward(ctx, dqo, dko):
        dq, dk = rope_backward(dqo, dko, *ctx.saved_tensors, ctx.layouts)
        return dq, dk, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2, -1) + eps)).to(x.dtype), as the Llama/Qwen/Mistral RMSNorm
    modules compute it; output dtype promote(weight, x). Gradients flow to x and weight."""
    if x.shape[-1:] != weight.shape:
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} does not match the last dimension "
                         f"of x {tuple(x.shape)}")
    if not (eps >= 0):
        raise ValueError(f"rms_norm: eps must be >= 0, got {eps}")
    if not use_triton(x, weight) or x.dtype not in TRITON_DTYPES or weight.dtype not in TRITON_DTYPES:
        return reference.rms_norm(x, weight, eps)
    return RMSNormFn.apply(x, weight, float(eps))


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate).to(gate.dtype) * up, as a SwiGLU MLP computes it between its projections."""
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    if not use_triton(gate, up) or gate.dtype not in TRITON_DTYPES or up.dtype not in TRITON_DTYPES:
        return reference.silu_mul(gate, up)
    return SiLUMulFn.apply(gate, up)


def rope_problem(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str | None:
    """Why rope cannot take these tensors (None if it can): what callers that fall back to
    transformers' apply_rotary_pos_emb check before calling it."""
    if q.dim() != 4 or k.dim() != 4:
        return f"q {tuple(q.shape)} and k {tuple(k.shape)} must be [batch, heads, tokens, head_dim]"
    B, _, T, D = q.shape
    if k.shape[0] != B or k.shape[2:] != q.shape[2:]:
        return f"k {tuple(k.shape)} must share q's {tuple(q.shape)} batch, tokens and head_dim"
    if D % 2:
        return f"head_dim {D} must be even: rotate_half splits each head in two halves"
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, B) or cos.shape[1:] != (T, D):
        return (f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be [{B} or 1, {T}, {D}] "
                f"([batch, tokens, head_dim], as the rotary embedding returns them)")
    if cos.requires_grad or sin.requires_grad:
        return "cos and sin must not require grad: rope gives gradients to q and k only (they are buffers)"
    return None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb(q, k, cos, sin): x * cos + rotate_half(x) * sin for the
    queries q [B, Hq, T, D] and keys k [B, Hkv, T, D] (any strides), cos and sin [B or 1, T, D];
    each output in promote(x, cos, sin), rounded as PyTorch rounds. Gradients flow to q and k."""
    problem = rope_problem(q, k, cos, sin)
    if problem is not None:
        raise ValueError(f"rope: {problem}")
    if not use_triton(q, k, cos, sin) or any(t.dtype not in TRITON_DTYPES for t in (q, k, cos, sin)):
        return reference.rope(q, k, cos, sin)
    return RoPEFn.apply(q, k, cos, sin)
