"""Selective log-probabilities: log_softmax(logits / T)[index] in one sweep over the vocabulary.

Bytes, not FLOPs, set the speed: a [N, V] bf16 logits tensor must be read once forward and
once backward, and d(logits) written once. Everything else here is O(N).

Forward: one program per row streams the vocabulary in BLOCK_V chunks with an online
log-sum-exp. The running max is a scalar per chunk (not per lane) so each logit costs one
exp; a per-lane max needs two, which at H100 bandwidth would saturate the SFU.
Backward: recompute p = exp(x - lse) from the saved lse and write
d(logits) = (g * (onehot - p) - g_H * p * (x - lse + H)) / T, in the logits dtype, optionally
straight into the logits buffer so no second [N, V] tensor ever exists.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import TRITON_DTYPES, next_pow2, use_triton
from ._validation import check_selective_inputs

# Chunk width and warps per program, swept on an H200 at N=8192, V=151936, bf16 (RESULTS.md):
# forward 8192 lanes x 4 warps reached 96% of copy bandwidth; 4096 x 4: 94%, 4096 x 8: 78%,
# 2048 x 4: 83%. Few warps with wide chunks keep 16-byte loads in flight without
# spreading the row's reductions over more threads than the chunk can feed. The backward,
# which also stores, did best with 8 warps (92% of its two-sweep floor vs 88% at 4).
FWD_BLOCK_V, FWD_WARPS = 8192, 4
BWD_BLOCK_V, BWD_WARPS = 8192, 8


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, stride_b, stride_t, T, V,
    index_ptr, row_mask_ptr,
    logp_ptr, lse_ptr, ent_ptr,
    inv_temp,
    BLOCK_V: tl.constexpr, HAS_ROW_MASK: tl.constexpr, WITH_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if HAS_ROW_MASK:
        # Padding tokens feed nothing downstream: skip their whole row of logits.
        if tl.load(row_mask_ptr + row) == 0:
            tl.store(logp_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
            if WITH_ENTROPY:
                tl.store(ent_ptr + row, 0.0)
            return
    base = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    sx = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # Until a finite logit shows up m_new is -inf, and exp(-inf - -inf) would be NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        e = tl.exp(x - m_ref)
        if WITH_ENTROPY:
            # sx = sum e * (x - max), kept relative to the running max: E[x] itself can be ~1e4
            # while the entropy is ~1, and lse - E[x] would then cancel away fp32's digits.
            shift = tl.where(m == float("-inf"), 0.0, m - m_ref)
            sx = alpha * (sx + s * shift) + tl.sum(e * tl.where(e > 0, x - m_ref, 0.0), axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
    lse = tl.where(m == float("-inf"), 0.0, m) + tl.log(s)
    idx = tl.load(index_ptr + row)
    x_idx = tl.load(base + idx).to(tl.float32) * inv_temp
    tl.store(logp_ptr + row, tl.minimum(x_idx - lse, 0.0))
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(ent_ptr + row, tl.log(s) - sx / s)


@triton.jit
def _dlogits_row(base, dbase, V, idx, lse, h, g, g_h, inv_temp, BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """Write one row of d(logits) = (g * (onehot - p) - g_h * p * (x - lse + H)) / T."""
    offs = tl.arange(0, BLOCK_V)
    if (g == 0.0) & (g_h == 0.0):
        # Masked tokens get no gradient: write zeros without reading the row.
        zeros = tl.zeros([BLOCK_V], tl.float32).to(dbase.dtype.element_ty)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            tl.store(dbase + cols, zeros, mask=cols < V)
    else:
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            valid = cols < V
            x = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_temp
            p = tl.exp(x - lse)
            d = g * (tl.where(cols == idx, 1.0, 0.0) - p)
            if WITH_ENTROPY:
                d -= g_h * p * tl.where(p > 0, x - lse + h, 0.0)
            tl.store(dbase + cols, (d * inv_temp).to(dbase.dtype.element_ty), mask=valid)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr, stride_b, stride_t,
    dlogits_ptr, dstride_b, dstride_t,
    T, V,
    index_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr,
    inv_temp,
    BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    dbase = dlogits_ptr + (row // T) * dstride_b + (row % T) * dstride_t
    g = tl.load(g_logp_ptr + row).to(tl.float32)
    g_h = 0.0
    h = 0.0
    if WITH_ENTROPY:
        g_h = tl.load(g_ent_ptr + row).to(tl.float32)
        h = tl.load(ent_ptr + row)
    _dlogits_row(base, dbase, V, tl.load(index_ptr + row), tl.load(lse_ptr + row), h, g, g_h, inv_temp,
                 BLOCK_V, WITH_ENTROPY)


def _as_rows(logits: torch.Tensor) -> torch.Tensor:
    """View logits [..., V] as [B, T, V] with a unit vocabulary stride, copying only if unavoidable."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if logits.dim() == 1:
        return logits.view(1, 1, -1)
    if logits.dim() == 2:
        return logits.unsqueeze(0)
    if logits.dim() == 3:
        return logits
    try:
        return logits.view(-1, logits.shape[-2], logits.shape[-1])
    except RuntimeError:
        return logits.reshape(-1, logits.shape[-2], logits.shape[-1])


def _launch_config(vocab: int, block: int, warps: int) -> tuple[int, int]:
    return min(next_pow2(vocab), block), warps


def logprobs_forward(logits, index, inv_temp, with_entropy, row_mask=None):
    """Launch the forward; returns (logits3, index_flat, logp, lse, entropy-or-None), flat [N]."""
    logits3 = _as_rows(logits)
    B, T, V = logits3.shape
    n = B * T
    index_flat = index.reshape(-1).contiguous()
    logp = torch.empty(n, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if with_entropy else lse  # dummy pointer when unused
    block, warps = _launch_config(V, FWD_BLOCK_V, FWD_WARPS)
    if n:
        _logprobs_fwd_kernel[(n,)](
            logits3, logits3.stride(0), logits3.stride(1), T, V,
            index_flat, row_mask if row_mask is not None else index_flat,
            logp, lse, ent, inv_temp,
            BLOCK_V=block, HAS_ROW_MASK=row_mask is not None, WITH_ENTROPY=with_entropy, num_warps=warps,
        )
    return logits3, index_flat, logp, lse, (ent if with_entropy else None)


def logprobs_backward(logits3, index_flat, lse, ent, g_logp, g_ent, inv_temp, inplace):
    """Launch the backward; returns d(logits) shaped like logits3 (the logits buffer if inplace)."""
    B, T, V = logits3.shape
    dlogits = logits3 if inplace else torch.empty(logits3.shape, device=logits3.device, dtype=logits3.dtype)
    with_entropy = g_ent is not None
    block, warps = _launch_config(V, BWD_BLOCK_V, BWD_WARPS)
    if B * T:
        _logprobs_bwd_kernel[(B * T,)](
            logits3, logits3.stride(0), logits3.stride(1),
            dlogits, dlogits.stride(0), dlogits.stride(1),
            T, V, index_flat, lse, ent if with_entropy else lse,
            g_logp.reshape(-1).contiguous(), g_ent.reshape(-1).contiguous() if with_entropy else lse,
            inv_temp,
            BLOCK_V=block, WITH_ENTROPY=with_entropy, num_warps=warps,
        )
    return dlogits


def mark_overwritten(logits: torch.Tensor) -> None:
    """The logits buffer now holds gradients: bump its version so any other op that saved it for
    backward fails loudly instead of reading gradients as logits."""
    torch.autograd.graph.increment_version(logits)


class SelectiveLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, index, temperature, return_entropy, inplace_backward):
        inv_temp = 1.0 / temperature
        logits3, index_flat, logp, lse, ent = logprobs_forward(logits, index, inv_temp, return_entropy)
        ctx.save_for_backward(logits3, index_flat, lse, ent if ent is not None else lse)
        ctx.meta = (inv_temp, return_entropy, inplace_backward, logits.shape)
        shape = index.shape
        if ent is None:
            ctx.mark_non_differentiable(lse)
            return logp.view(shape), lse.view(shape)
        return logp.view(shape), ent.view(shape)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits3, index_flat, lse, ent = ctx.saved_tensors
        inv_temp, with_entropy, inplace, shape = ctx.meta
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        g_ent = g_ent if with_entropy else None
        if with_entropy and g_ent is None:
            g_ent = torch.zeros_like(lse)
        dlogits = logprobs_backward(logits3, index_flat, lse, ent, g_logp, g_ent, inv_temp, inplace)
        if inplace:
            mark_overwritten(logits3)
        return dlogits.view(shape).detach(), None, None, None, None


def selective_logprobs(
    logits: torch.Tensor,
    index: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    validate: bool = True,
):
    """log_softmax(logits / temperature) gathered at `index`.

    Args:
        logits: [..., V] bf16/fp16/fp32 (fp64 runs the reference). Strided views such as
            `logits[:, :-1]` are read in place, without a copy.
        index: [...] int64 token ids.
        temperature: the sampling temperature; log-probs are those of the tempered distribution.
        return_entropy: also return the entropy of that distribution (differentiable).
        inplace_backward: let the backward overwrite the logits buffer with d(logits). Only safe
            when nothing else needs the logits after this op (true for the usual lm_head output).
        validate: check shapes and the index range (one host sync).
    Returns:
        float32 log-probs [...], plus the float32 entropy [...] when asked.
    """
    if validate:
        check_selective_inputs(logits, index, temperature)
    if not use_triton(logits) or logits.dtype not in TRITON_DTYPES:
        return reference.selective_logprobs(
            logits, index, temperature=temperature, return_entropy=return_entropy, validate=False
        )
    logp, ent = SelectiveLogprobs.apply(logits, index, float(temperature), return_entropy, inplace_backward)
    return (logp, ent) if return_entropy else logp
