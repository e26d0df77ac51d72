"""Selective log-probabilities: log_softmax(logits / T)[index] in one sweep over the vocabulary.

Bytes, not FLOPs, set the speed: a [N, V] bf16 logits tensor must be read once forward and
once backward, and d(logits) written once. Everything else here is O(N).

Forward: one program per row streams the vocabulary in BLOCK_V chunks with an online
log-sum-exp. The running max is a scalar per chunk (not per lane) so each logit costs one
exp; a per-lane max needs two, which at H100 bandwidth would saturate the SFU.
Backward: recompute p = exp(x - lse) from the saved lse and write
d(logits) = (g * (onehot - p) - g_H * p * (x - lse + H)) / T, in the logits dtype, optionally
straight into the logits buffer so no second [N, V] tensor ever exists.

Unshifted logits: a causal LM's head returns [B, C+1, V] for C completion tokens, the last
position predicting past the end. Slicing it off in autograd costs a zero-filled copy of the
whole tensor in backward, so the kernels take the head output as is: the forward reads
positions 0..C-1 only and the backward writes zeros into the last one, in the same launch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import TRITON_DTYPES, next_pow2, use_triton
from ._validation import check_selective_inputs, is_shifted

# Chunk width and warps per program, swept on an H200 at N=8192, V=151936, bf16 (RESULTS.md):
# forward 8192 lanes x 4 warps reached 96% of copy bandwidth; 4096 x 4: 94%, 4096 x 8: 78%,
# 2048 x 4: 83%. Few warps with wide chunks keep 16-byte loads in flight without
# spreading the row's reductions over more threads than the chunk can feed. The backward,
# which also stores, did best with 8 warps (92% of its two-sweep floor vs 88% at 4).
FWD_BLOCK_V, FWD_WARPS = 8192, 4
BWD_BLOCK_V, BWD_WARPS = 8192, 8


@triton.jit
def _online_lse(base, n_cols, inv_temp, m, s, sx, BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """Fold the logits base[0:n_cols] / T into a running (max m, sum of exp(x - m) s, and with
    entropy sx = sum of exp(x - m) * (x - m)); returns the new (m, s, sx)."""
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # Until a finite logit shows up m_new is -inf, and exp(-inf - -inf) would be NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        e = tl.exp(x - m_ref)
        if WITH_ENTROPY:
            # sx stays relative to the running max: E[x] itself can be ~1e4 while the entropy is
            # ~1, and lse - E[x] would then cancel away fp32's digits.
            shift = tl.where(m == float("-inf"), 0.0, m - m_ref)
            sx = alpha * (sx + s * shift) + tl.sum(e * tl.where(e > 0, x - m_ref, 0.0), axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
    return m, s, sx


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
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    sx = tl.full([], 0.0, tl.float32)
    m, s, sx = _online_lse(base, V, inv_temp, m, s, sx, BLOCK_V, WITH_ENTROPY)
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
    T, T_LOGITS, V,
    index_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr,
    inv_temp,
    BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr,
):
    # One program per row of logits: T_LOGITS is T, or T + 1 for unshifted logits, whose last
    # position gets a zero gradient (g = 0 writes zeros without reading the row).
    prog = tl.program_id(0).to(tl.int64)
    b = prog // T_LOGITS
    t = prog % T_LOGITS
    is_token = t < T
    row = b * T + tl.minimum(t, T - 1)
    base = logits_ptr + b * stride_b + t * stride_t
    dbase = dlogits_ptr + b * dstride_b + t * dstride_t
    g = tl.where(is_token, tl.load(g_logp_ptr + row).to(tl.float32), 0.0)
    g_h = 0.0
    h = 0.0
    if WITH_ENTROPY:
        g_h = tl.where(is_token, tl.load(g_ent_ptr + row).to(tl.float32), 0.0)
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


@dataclass(frozen=True)
class Rows:
    """How [..., V] logits map onto the kernels' rows: logits3 is [B, T_logits, V] (T_logits = T,
    or T + 1 for unshifted logits), index_flat is [B * T]."""

    logits3: torch.Tensor
    index_flat: torch.Tensor
    T: int

    @property
    def tokens(self) -> int:
        return self.index_flat.numel()


def as_rows(logits: torch.Tensor, index: torch.Tensor) -> Rows:
    logits3 = _as_rows(logits)
    T = logits3.shape[1] - (1 if is_shifted(logits, index) else 0)
    return Rows(logits3, index.reshape(-1).contiguous(), T)


def logprobs_forward(rows: Rows, inv_temp, with_entropy, row_mask=None):
    """Launch the forward; returns (logp, lse, entropy-or-None), each flat [B * T]."""
    logits3 = rows.logits3
    n = rows.tokens
    logp = torch.empty(n, device=logits3.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if with_entropy else lse  # dummy pointer when unused
    block, warps = _launch_config(logits3.shape[2], FWD_BLOCK_V, FWD_WARPS)
    if n:
        _logprobs_fwd_kernel[(n,)](
            logits3, logits3.stride(0), logits3.stride(1), rows.T, logits3.shape[2],
            rows.index_flat, row_mask if row_mask is not None else rows.index_flat,
            logp, lse, ent, inv_temp,
            BLOCK_V=block, HAS_ROW_MASK=row_mask is not None, WITH_ENTROPY=with_entropy, num_warps=warps,
        )
    return logp, lse, (ent if with_entropy else None)


def gradient_buffer(logits3: torch.Tensor, inplace: bool, tokens: int) -> torch.Tensor:
    """Where d(logits) goes: the logits themselves, or a new tensor. With no token at all no
    kernel runs, so the buffer is zero-filled here instead."""
    if inplace:
        return logits3.zero_() if not tokens else logits3
    if not tokens:
        return torch.zeros(logits3.shape, device=logits3.device, dtype=logits3.dtype)
    return torch.empty(logits3.shape, device=logits3.device, dtype=logits3.dtype)


def logprobs_backward(rows: Rows, lse, ent, g_logp, g_ent, inv_temp, inplace):
    """Launch the backward; returns d(logits) shaped like rows.logits3 (that buffer if inplace)."""
    logits3 = rows.logits3
    B, T_logits, V = logits3.shape
    dlogits = gradient_buffer(logits3, inplace, rows.tokens)
    with_entropy = g_ent is not None
    block, warps = _launch_config(V, BWD_BLOCK_V, BWD_WARPS)
    if rows.tokens:
        _logprobs_bwd_kernel[(B * T_logits,)](
            logits3, logits3.stride(0), logits3.stride(1),
            dlogits, dlogits.stride(0), dlogits.stride(1),
            rows.T, T_logits, V, rows.index_flat, lse, ent if with_entropy else lse,
            g_logp.reshape(-1).contiguous(), g_ent.reshape(-1).contiguous() if with_entropy else lse,
            inv_temp,
            BLOCK_V=block, WITH_ENTROPY=with_entropy, num_warps=warps,
        )
    return dlogits


def inplace_is_safe(logits: torch.Tensor) -> bool:
    """Whether the backward may overwrite `logits` with d(logits) when the caller did not say.

    Yes for a tensor that autograd produced (a model head's output, or a view of one): the only
    reader left after this op's backward is that producer's backward, which needs d(logits), not
    the logits. No for a leaf, a view of a leaf, or a tensor without grad: the caller owns that
    memory and may read it again.
    """
    if not logits.requires_grad or logits.grad_fn is None:
        return False
    base = logits._base
    return base is None or base.grad_fn is not None


def may_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of `t` can share memory (an expanded tensor): taking dims by stride,
    each must step past everything the smaller ones reach. Conservative: False means they never do."""
    reach = 0
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def resolve_inplace(logits: torch.Tensor, inplace_backward: bool | None) -> bool:
    """In place only where each logit has its own memory: rows that share it (expand) would each
    write their own gradient over the others', whatever the caller asked for."""
    if may_overlap(logits):
        return False
    return inplace_is_safe(logits) if inplace_backward is None else bool(inplace_backward)


def mark_overwritten(logits: torch.Tensor) -> None:
    """The logits buffer now holds gradients: bump its version so any other op that saved it for
    backward fails loudly instead of reading gradients as logits."""
    torch.autograd.graph.increment_version(logits)


class SelectiveLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, index, temperature, return_entropy, inplace_backward):
        inv_temp = 1.0 / temperature
        rows = as_rows(logits, index)
        logp, lse, ent = logprobs_forward(rows, inv_temp, return_entropy)
        # The logits and index go through save_for_backward (views share the caller's version
        # counter), so editing either in place before backward raises instead of corrupting it.
        ctx.save_for_backward(rows.logits3, rows.index_flat, lse, ent)
        ctx.meta = (inv_temp, return_entropy, inplace_backward, logits.shape, rows.T)
        shape = index.shape
        if ent is None:
            ctx.mark_non_differentiable(lse)
            return logp.view(shape), lse.view(shape)
        return logp.view(shape), ent.view(shape)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits3, index_flat, lse, ent = ctx.saved_tensors
        inv_temp, with_entropy, inplace, shape, T = ctx.meta
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        g_ent = g_ent if with_entropy else None
        if with_entropy and g_ent is None:
            g_ent = torch.zeros_like(lse)
        dlogits = logprobs_backward(Rows(logits3, index_flat, T), lse, ent, g_logp, g_ent, inv_temp, inplace)
        if inplace:
            mark_overwritten(logits3)
        return dlogits.view(shape).detach(), None, None, None, None


def selective_logprobs(
    logits: torch.Tensor,
    index: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    inplace_backward: bool | None = None,
    validate: bool = True,
):
    """log_softmax(logits / temperature) gathered at `index`.

    Args:
        logits: [..., V] bf16/fp16/fp32 (fp64 runs the reference). Strided views such as
            `logits[:, :-1]` are read in place, without a copy. Unshifted logits, one position
            longer than `index` ([B, C+1, V] for index [B, C], a causal LM head's output), are
            taken as they are: position t scores index[t] and the last position is skipped (its
            gradient is zero), with no slice and no copy.
        index: [...] int64 token ids.
        temperature: the sampling temperature; log-probs are those of the tempered distribution.
        return_entropy: also return the entropy of that distribution (differentiable).
        inplace_backward: whether the backward writes d(logits) into the logits buffer, so no
            second [N, V] tensor exists. None (default) decides per call: in place when autograd
            produced the logits (a non-leaf such as a model head's output, or a view of one),
            which nothing reads after this op's backward but the producer's backward; out of
            place for a leaf, a view of a leaf, or anything the caller owns. True forces it (the
            logits then hold gradients after backward); False never writes into them. In place,
            the logits' version is bumped, so another op that saved them for its backward raises.
        validate: check shapes and the index range (one host sync).
    Returns:
        float32 log-probs [...] (index's shape), plus the float32 entropy [...] when asked.
    """
    if validate:
        check_selective_inputs(logits, index, temperature)
    if not use_triton(logits) or logits.dtype not in TRITON_DTYPES:
        return reference.selective_logprobs(
            logits, index, temperature=temperature, return_entropy=return_entropy, validate=False
        )
    inplace = resolve_inplace(logits, inplace_backward)
    logp, ent = SelectiveLogprobs.apply(logits, index, float(temperature), return_entropy, inplace)
    return (logp, ent) if return_entropy else logp
