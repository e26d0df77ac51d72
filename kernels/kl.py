"""k3 estimator of KL(policy || reference) per token: exp(d) - d - 1 with d = ref - logp.

Unbiased, always >= 0, and cheap: one exp per token. Elementwise, so one flat launch over the
contiguous tensors; gradients flow to both inputs (d/dlogp = 1 - exp(d), d/dref = exp(d) - 1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import TRITON_DTYPES, use_triton

BLOCK = 1024


@triton.jit
def _kl_fwd_kernel(lp_ptr, ref_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    d = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32) - tl.load(lp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, tl.exp(d) - d - 1.0, mask=inb)


@triton.jit
def _kl_bwd_kernel(lp_ptr, ref_ptr, g_ptr, dlp_ptr, dref_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    d = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32) - tl.load(lp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    e1 = tl.exp(d) - 1.0
    tl.store(dlp_ptr + offs, (-g * e1).to(dlp_ptr.dtype.element_ty), mask=inb)
    tl.store(dref_ptr + offs, (g * e1).to(dref_ptr.dtype.element_ty), mask=inb)


class KLK3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logps, ref_logps):
        lp, ref = logps.contiguous(), ref_logps.contiguous()
        out = torch.empty(lp.shape, device=lp.device, dtype=torch.float32)
        n = lp.numel()
        if n:
            _kl_fwd_kernel[(triton.cdiv(n, BLOCK),)](lp, ref, out, n, BLOCK=BLOCK)
        ctx.save_for_backward(lp, ref)
        return out

    @staticmethod
    def backward(ctx, g):
        lp, ref = ctx.saved_tensors
        dlp, dref = torch.empty_like(lp), torch.empty_like(ref)
        n = lp.numel()
        if n:
            _kl_bwd_kernel[(triton.cdiv(n, BLOCK),)](lp, ref, g.contiguous(), dlp, dref, n, BLOCK=BLOCK)
        return dlp, dref


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 KL [same shape], float32."""
    if not isinstance(logps, torch.Tensor) or not isinstance(ref_logps, torch.Tensor):
        raise ValueError("logps and ref_logps must be tensors")
    if logps.shape != ref_logps.shape:
        raise ValueError(f"ref_logps shape {tuple(ref_logps.shape)} must equal logps shape {tuple(logps.shape)}")
    if logps.dtype not in TRITON_DTYPES + (torch.float64,) or ref_logps.dtype not in TRITON_DTYPES + (torch.float64,):
        raise ValueError(f"logps and ref_logps must be floating tensors, got {logps.dtype} and {ref_logps.dtype}")
    if not use_triton(logps, ref_logps) or logps.dtype not in TRITON_DTYPES:
        return reference.kl_k3(logps, ref_logps)
    return KLK3.apply(logps, ref_logps)
