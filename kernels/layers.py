"""The decoder layer's elementwise work in fused kernels, forward and backward: RMSNorm and SwiGLU.

In a training step of a small model over long sequences these are a visible share of the time: an
HF RMSNorm is ~6 kernels forward (cast, square, mean, rsqrt, two multiplies) and more in backward,
each a full pass over a [tokens, hidden] tensor; SiLU-mul is 2 forward and ~5 backward. Here each
is one pass forward and one backward, computed in float32 and rounded where the HF modules round,
so a patched model's outputs match the stock one's bit for bit in float32 and to bf16 rounding
otherwise.

  rms_norm(x, weight, eps) = weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype)      (last dim)
  silu_mul(gate, up)       = silu(gate).to(dtype) * up

rms_norm saves only the per-row 1/rms (float32) for backward; silu_mul saves its inputs.
"""
from __future__ import annotations

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


class RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        H = x.shape[-1]
        x2 = x.reshape(-1, H).contiguous()
        R = x2.shape[0]
        y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
        rstd = torch.empty(R, dtype=torch.float32, device=x.device)
        if R:
            _rms_norm_fwd_kernel[(R,)](x2, weight.contiguous(), y, rstd, H, eps, BLOCK=next_pow2(H),
                                       num_warps=_warps(H))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        R, H = x2.shape
        dx = torch.empty_like(x2)
        sms = torch.cuda.get_device_properties(x2.device).multi_processor_count if x2.is_cuda else 4
        programs = max(1, min(R, NORM_BWD_PROGRAMS_PER_SM * sms))
        per = triton.cdiv(R, programs) if R else 1
        programs = triton.cdiv(R, per) if R else 1
        partial = torch.zeros((programs, H), dtype=torch.float32, device=x2.device)
        if R:
            _rms_norm_bwd_kernel[(programs,)](x2, weight.contiguous(), rstd, dy.reshape(-1, H).contiguous(), dx,
                                              partial, R, H, per, BLOCK=next_pow2(H), num_warps=_warps(H))
        dw = partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dw, None


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


class SiLUMulFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g, u = gate.contiguous(), up.contiguous()
        y = torch.empty(g.shape, dtype=torch.promote_types(g.dtype, u.dtype), device=g.device)
        n = g.numel()
        if n:
            _silu_mul_fwd_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](g, u, y, n, BLOCK=ELEMENTWISE_BLOCK)
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        if n:
            _silu_mul_bwd_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](g, u, dy.contiguous(), dg, du, n,
                                                                       BLOCK=ELEMENTWISE_BLOCK)
        return dg, du


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
