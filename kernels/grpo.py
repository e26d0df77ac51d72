"""The GRPO clipped-surrogate loss with k3 KL, on token log-probs or fused with the logits.

Design: one program per sequence walks its T tokens and writes its sums (masked loss, KL,
low/high/region clip counts, token count); whichever program finishes last folds them into the
scalar loss and the statistics. Loss types (grpo, bnpo, dr_grpo, dapo, cispo) differ only in
what a row's sum is divided by, so the backward gives each row its weight and writes d(logp)
per token. One launch each way, no host sync: at small shapes the eager version's dozens of
launches, not bytes, are what costs, and on a slow host even a Triton launch (~40 us) counts.

GSPO (sequence-level importance sampling) needs the sequence's mean log-ratio before any token's
loss: a first sweep over the row computes it. Its gradient reduces to the token formula with the
sequence ratio in place of the token ratio (the 1/n of the mean cancels the n identical terms).

`grpo_loss_from_logits` runs the selective log-prob sweep first (rows of padding are skipped
outright), then the loss; its backward is a single launch in which each token program recomputes
its own d(logp) and writes its row of d(logits), into the logits buffer when that is safe (see
`grpo_loss_from_logits`). The logits are read twice and written once in all. Given a model head's
unshifted [B, C+1, V] output, the last position is skipped forward and zeroed backward, so the
gradient lands in the very tensor the head's backward consumes: peak memory stays at the logits
plus O(B*T) floats, with no slice for autograd to zero-fill.

Every tensor the backward reads goes through save_for_backward: editing advantages, mask, old or
reference log-probs, index or logits in place between forward and backward raises.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import TRITON_DTYPES, next_pow2, use_triton
from ._validation import LossConfig, check_loss_inputs, check_selective_inputs, loss_config
from .logprobs import (BWD_BLOCK_V, BWD_WARPS, Rows, _dlogits_row, _launch_config, as_rows, gradient_buffer,
                       logprobs_forward, mark_overwritten, resolve_inplace)
from .reference import masked_mean

MAX_BLOCK_T = 1024
NUM_WARPS = 4
N_OUT = 6  # the folded result: loss, kl, clip low, clip high, clip region, normaliser
LOSS, KL, LOW, HIGH, REGION, NORM = range(N_OUT)


@triton.jit
def _surrogate(ratio, lp, ref, a, beta, eps_low, eps_high, delta,
               HAS_REF: tl.constexpr, HAS_DELTA: tl.constexpr, CISPO: tl.constexpr,
               KL_IS: tl.constexpr, SEQ: tl.constexpr):
    """Per-token loss, its derivative in logp (through ratio = exp(logp - old)), and the KL.

    With KL_IS the KL is weighted by the importance ratio (TRL's use_bias_correction_kl). At
    sequence level that ratio also depends on the row's other tokens; the backward adds that term.
    """
    if CISPO:
        w = tl.minimum(ratio, eps_high)  # a constant weight: no gradient through the ratio
        loss = -w * a * lp
        dloss = -w * a
    else:
        clipped = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
        unclipped = ratio
        d_unclipped = a * ratio
        if HAS_DELTA:
            unclipped = tl.minimum(ratio, delta)
            d_unclipped = tl.where(ratio <= delta, d_unclipped, 0.0)
        d_clipped = tl.where((ratio >= 1.0 - eps_low) & (ratio <= 1.0 + eps_high), a * ratio, 0.0)
        t1 = unclipped * a
        t2 = clipped * a
        loss = -tl.minimum(t1, t2)
        # Ties split the gradient, as torch.minimum does, so results match autograd bit for bit.
        dloss = -tl.where(t1 < t2, d_unclipped, tl.where(t2 < t1, d_clipped, 0.5 * (d_unclipped + d_clipped)))
    kl = tl.zeros_like(lp)
    if HAS_REF:
        d = ref - lp
        e = tl.exp(d)
        kl = e - d - 1.0
        if KL_IS:
            dloss += beta * ratio * (1.0 - e)
            if not SEQ:
                dloss += beta * kl * ratio  # d(ratio)/d(logp) = ratio for a token-level ratio
            kl = kl * ratio
        else:
            dloss += beta * (1.0 - e)
        loss += beta * kl
    return loss, dloss, kl


@triton.jit
def _load_row(lp_ptr, old_ptr, ref_ptr, mask_ptr, row, cols, T, s_lp, s_old, s_ref, s_mask,
              HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr):
    inb = cols < T
    m = (tl.load(mask_ptr + row * s_mask + cols, mask=inb, other=0) != 0) & inb
    lp = tl.load(lp_ptr + row * s_lp + cols, mask=m, other=0.0).to(tl.float32)
    old = lp
    if HAS_OLD:
        old = tl.load(old_ptr + row * s_old + cols, mask=m, other=0.0).to(tl.float32)
    ref = lp
    if HAS_REF:
        ref = tl.load(ref_ptr + row * s_ref + cols, mask=m, other=0.0).to(tl.float32)
    return m, lp, old, ref


@triton.jit
def _sequence_log_ratio(lp_ptr, old_ptr, mask_ptr, row, T, s_lp, s_old, s_mask, BLOCK_T: tl.constexpr):
    offs = tl.arange(0, BLOCK_T)
    acc = tl.zeros([BLOCK_T], tl.float32)
    cnt = tl.zeros([BLOCK_T], tl.float32)
    for start in range(0, T, BLOCK_T):
        m, lp, old, _ = _load_row(lp_ptr, old_ptr, lp_ptr, mask_ptr, row, start + offs, T,
                                  s_lp, s_old, s_lp, s_mask, True, False)
        acc += tl.where(m, lp - old, 0.0)
        cnt += m.to(tl.float32)
    return tl.sum(acc, axis=0) / tl.maximum(tl.sum(cnt, axis=0), 1.0)


# Per-sequence partial results, [B, ROW] float32, read by the fold and the backward. Columns:
# 0 masked loss sum, 1 KL sum, 2 / 3 / 4 clipped-low / high / region counts, 5 tokens,
# 6 the sequence log-ratio (GSPO), 7 padding (rows of 32 bytes).
ROW = 8


@triton.jit
def _fold(rows_ptr, out_ptr, B, fixed_norm, KIND: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_B: tl.constexpr):
    """Fold the [B, ROW] row sums into out = [loss, kl, low, high, region, normaliser]."""
    offs = tl.arange(0, BLOCK_B)
    tot = tl.zeros([BLOCK_B], tl.float32)
    kl = tl.zeros([BLOCK_B], tl.float32)
    low = tl.zeros([BLOCK_B], tl.float32)
    high = tl.zeros([BLOCK_B], tl.float32)
    tok = tl.zeros([BLOCK_B], tl.float32)
    seq_means = tl.zeros([BLOCK_B], tl.float32)
    for start in range(0, B, BLOCK_B):
        r = start + offs
        inb = r < B
        base = rows_ptr + r.to(tl.int64) * 8
        # .cg: other programs wrote these rows; read them from L2, never from a stale L1 line.
        loss_b = tl.load(base + 0, mask=inb, other=0.0, cache_modifier=".cg")
        n_b = tl.load(base + 5, mask=inb, other=0.0, cache_modifier=".cg")
        tot += loss_b
        kl += tl.load(base + 1, mask=inb, other=0.0, cache_modifier=".cg")
        low += tl.load(base + 2, mask=inb, other=0.0, cache_modifier=".cg")
        high += tl.load(base + 3, mask=inb, other=0.0, cache_modifier=".cg")
        tok += n_b
        seq_means += loss_b / tl.maximum(n_b, 1.0)
    ntok = tl.maximum(tl.sum(tok, axis=0), 1.0)
    if KIND == 0:
        norm = B * 1.0
        loss = tl.sum(seq_means, axis=0) / B
    else:
        if HAS_NORM:
            norm = tl.maximum(fixed_norm, 1.0)
        else:
            norm = ntok
        loss = tl.sum(tot, axis=0) / norm
    lo = tl.sum(low, axis=0) / ntok
    hi = tl.sum(high, axis=0) / ntok
    tl.store(out_ptr + 0, loss)
    tl.store(out_ptr + 1, tl.sum(kl, axis=0) / ntok)
    tl.store(out_ptr + 2, lo)
    tl.store(out_ptr + 3, hi)
    tl.store(out_ptr + 4, lo + hi)  # a token cannot be clipped low and high at once
    tl.store(out_ptr + 5, norm)


@triton.jit
def _grpo_fwd_kernel(
    lp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, rows_ptr, out_ptr, ticket_ptr,
    B, T, s_lp, s_old, s_ref, s_mask,
    beta, eps_low, eps_high, delta, fixed_norm,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_DELTA: tl.constexpr,
    CISPO: tl.constexpr, SEQ: tl.constexpr, KL_IS: tl.constexpr,
    KIND: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    a = tl.load(adv_ptr + row).to(tl.float32)
    # Clipping only binds on the side the advantage pushes towards (TRL's clip statistics).
    a_neg = tl.where(a < 0, 1.0, 0.0)
    a_pos = tl.where(a > 0, 1.0, 0.0)
    offs = tl.arange(0, BLOCK_T)
    seq_lr = 0.0
    if SEQ and HAS_OLD:
        seq_lr = _sequence_log_ratio(lp_ptr, old_ptr, mask_ptr, row, T, s_lp, s_old, s_mask, BLOCK_T)
    loss_acc = tl.zeros([BLOCK_T], tl.float32)
    kl_acc = tl.zeros([BLOCK_T], tl.float32)
    low_acc = tl.zeros([BLOCK_T], tl.float32)
    high_acc = tl.zeros([BLOCK_T], tl.float32)
    tok_acc = tl.zeros([BLOCK_T], tl.float32)
    for start in range(0, T, BLOCK_T):
        m, lp, old, ref = _load_row(lp_ptr, old_ptr, ref_ptr, mask_ptr, row, start + offs, T,
                                    s_lp, s_old, s_ref, s_mask, HAS_OLD, HAS_REF)
        if SEQ:
            ratio = tl.exp(tl.zeros_like(lp) + seq_lr)
        else:
            ratio = tl.exp(lp - old)
        loss, _, kl = _surrogate(ratio, lp, ref, a, beta, eps_low, eps_high, delta, HAS_REF, HAS_DELTA, CISPO,
                                 KL_IS, SEQ)
        loss_acc += tl.where(m, loss, 0.0)
        kl_acc += tl.where(m, kl, 0.0)
        low_acc += tl.where(m & (ratio < 1.0 - eps_low), a_neg, 0.0)
        high_acc += tl.where(m & (ratio > 1.0 + eps_high), a_pos, 0.0)
        tok_acc += m.to(tl.float32)
    out = rows_ptr + row * 8
    low = tl.sum(low_acc, axis=0)
    high = tl.sum(high_acc, axis=0)
    tl.store(out + 0, tl.sum(loss_acc, axis=0))
    tl.store(out + 1, tl.sum(kl_acc, axis=0))
    tl.store(out + 2, low)
    tl.store(out + 3, high)
    tl.store(out + 4, low + high)
    tl.store(out + 5, tl.sum(tok_acc, axis=0))
    tl.store(out + 6, seq_lr)
    # The program that takes the last ticket folds every row: one launch instead of two. The
    # atomic is acq_rel, so each program's row stores are visible to whoever takes the last one.
    if tl.atomic_add(ticket_ptr, 1) == B - 1:
        _fold(rows_ptr, out_ptr, B, fixed_norm, KIND, HAS_NORM, BLOCK_B)


@triton.jit
def _row_scale(rows_ptr, out_ptr, g_ptr, row, B, beta,
               HAS_REF: tl.constexpr, SEQ: tl.constexpr, KL_IS: tl.constexpr, KIND: tl.constexpr):
    """Per sequence: (d loss / d row sum, the sequence log-ratio, GSPO's KL-weight gradient term)."""
    base = rows_ptr + row * 8
    if KIND == 0:  # grpo: mean over sequences of per-sequence token means
        weight = 1.0 / (B * tl.maximum(tl.load(base + 5), 1.0))
    else:  # bnpo/dapo/cispo: the token normaliser; dr_grpo: B * L
        weight = 1.0 / tl.load(out_ptr + 5)
    seq_kl_term = 0.0
    if SEQ and KL_IS and HAS_REF:
        # A sequence ratio r = exp(mean log-ratio) moves every token's weighted KL: d/dlogp_t of
        # beta * r * sum(kl) is beta * r * sum(kl) / n, and the forward stored r * sum(kl).
        seq_kl_term = beta * tl.load(base + 1) / tl.maximum(tl.load(base + 5), 1.0)
    return tl.load(g_ptr).to(tl.float32) * weight, tl.load(base + 6), seq_kl_term


@triton.jit
def _grpo_bwd_kernel(
    lp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, rows_ptr, out_ptr, g_ptr, dlp_ptr,
    B, T, s_lp, s_old, s_ref, s_mask, s_dlp,
    beta, eps_low, eps_high, delta,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_DELTA: tl.constexpr,
    CISPO: tl.constexpr, SEQ: tl.constexpr, KL_IS: tl.constexpr, KIND: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    a = tl.load(adv_ptr + row).to(tl.float32)
    g, seq_lr, seq_kl_term = _row_scale(rows_ptr, out_ptr, g_ptr, row, B, beta, HAS_REF, SEQ, KL_IS, KIND)
    offs = tl.arange(0, BLOCK_T)
    for start in range(0, T, BLOCK_T):
        cols = start + offs
        m, lp, old, ref = _load_row(lp_ptr, old_ptr, ref_ptr, mask_ptr, row, cols, T,
                                    s_lp, s_old, s_ref, s_mask, HAS_OLD, HAS_REF)
        if SEQ:
            ratio = tl.exp(tl.zeros_like(lp) + seq_lr)
        else:
            ratio = tl.exp(lp - old)
        _, dloss, _ = _surrogate(ratio, lp, ref, a, beta, eps_low, eps_high, delta, HAS_REF, HAS_DELTA, CISPO,
                                 KL_IS, SEQ)
        dloss += seq_kl_term
        tl.store(dlp_ptr + row * s_dlp + cols, tl.where(m, g * dloss, 0.0).to(dlp_ptr.dtype.element_ty), mask=cols < T)


@triton.jit
def _token_dloss(lp, b, t, old_ptr, ref_ptr, adv_ptr, s_old, s_ref, seq_lr, beta, eps_low, eps_high, delta,
                 HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_DELTA: tl.constexpr, CISPO: tl.constexpr,
                 SEQ: tl.constexpr, KL_IS: tl.constexpr):
    """d(surrogate + KL)/d(logp) of token(s) t of row(s) b with log-prob(s) lp, before the row's
    weight: the per-token gradient every GRPO backward here starts from (scalars or blocks)."""
    old = lp
    if HAS_OLD:
        old = tl.load(old_ptr + b * s_old + t).to(tl.float32)
    ref = lp
    if HAS_REF:
        ref = tl.load(ref_ptr + b * s_ref + t).to(tl.float32)
    if SEQ:
        ratio = tl.exp(seq_lr + 0.0 * lp)
    else:
        ratio = tl.exp(lp - old)
    a = tl.load(adv_ptr + b).to(tl.float32)
    _, dloss, _ = _surrogate(ratio, lp, ref, a, beta, eps_low, eps_high, delta, HAS_REF, HAS_DELTA, CISPO,
                             KL_IS, SEQ)
    return dloss


@triton.jit
def _grpo_logits_bwd_kernel(
    logits_ptr, stride_b, stride_t, dlogits_ptr, dstride_b, dstride_t, V, index_ptr, lse_ptr,
    lp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, rows_ptr, out_ptr, g_ptr,
    B, T, T_LOGITS, s_old, s_ref, s_mask,
    beta, eps_low, eps_high, delta, inv_temp,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_DELTA: tl.constexpr, CISPO: tl.constexpr,
    SEQ: tl.constexpr, KL_IS: tl.constexpr, KIND: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One row of logits per program: its token's d(logp) from the loss, then its row of
    d(logits), in one launch. T_LOGITS = T + 1 for unshifted logits: that last row gets zeros."""
    prog = tl.program_id(0).to(tl.int64)
    b = prog // T_LOGITS
    t_row = prog % T_LOGITS
    t = tl.minimum(t_row, T - 1)
    tok = b * T + t
    m = (tl.load(mask_ptr + b * s_mask + t) != 0) & (t_row < T)
    g, seq_lr, seq_kl_term = _row_scale(rows_ptr, out_ptr, g_ptr, b, B, beta, HAS_REF, SEQ, KL_IS, KIND)
    dloss = _token_dloss(tl.load(lp_ptr + tok), b, t, old_ptr, ref_ptr, adv_ptr, s_old, s_ref, seq_lr, beta,
                         eps_low, eps_high, delta, HAS_OLD, HAS_REF, HAS_DELTA, CISPO, SEQ, KL_IS)
    g_tok = tl.where(m, g * (dloss + seq_kl_term), 0.0)
    _dlogits_row(logits_ptr + b * stride_b + t_row * stride_t, dlogits_ptr + b * dstride_b + t_row * dstride_t, V,
                 tl.load(index_ptr + tok), tl.load(lse_ptr + tok), 0.0, g_tok, 0.0, inv_temp, BLOCK_V, False)


def _rowwise(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    return t if t.stride(-1) == 1 else t.contiguous()


def _mask_view(mask: torch.Tensor) -> torch.Tensor:
    mask = _rowwise(mask)
    # Triton loads bool as i1 pointers inconsistently across versions; the bytes are the same.
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


_KINDS = {"grpo": 0, "bnpo": 1, "dapo": 1, "cispo": 1, "dr_grpo": 2}


class _LossTensors(NamedTuple):
    """The token tensors of one loss call as the kernels read them (row-contiguous). Each is the
    caller's tensor or a view of it unless a copy was unavoidable, so saving these for backward
    ties them to the caller's version counters."""

    lp: torch.Tensor
    old: torch.Tensor | None
    ref: torch.Tensor | None
    adv: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def of(cls, logps, old_logps, ref_logps, advantages, mask) -> "_LossTensors":
        return cls(_rowwise(logps), _rowwise(old_logps), _rowwise(ref_logps), advantages.contiguous(),
                   _mask_view(mask))

    def pointers(self) -> tuple:
        """(lp, old, ref, adv, mask) with the log-probs standing in for absent old / ref
        (HAS_OLD / HAS_REF keep them unread)."""
        return (self.lp, self.old if self.old is not None else self.lp,
                self.ref if self.ref is not None else self.lp, self.adv, self.mask)


class _LossLaunch:
    """What the launches of one loss call share beyond tensors: shapes, options, normaliser.

    Holds no tensor: everything the backward reads comes back through ctx.saved_tensors.
    """

    def __init__(self, t: _LossTensors, cfg: LossConfig, max_completion_length, num_items):
        self.cfg = cfg
        self.has_old, self.has_ref = t.old is not None, t.ref is not None
        self.B, self.T = t.lp.shape
        self.block = min(next_pow2(max(self.T, 1)), MAX_BLOCK_T)
        self.kind = _KINDS[cfg.loss_type]
        if self.kind == 2:
            self.norm = float(self.B * (max_completion_length or self.T))
        elif self.kind == 1 and num_items is not None:
            self.norm = float(num_items)  # a tensor here costs one host sync
        else:
            self.norm = None

    def _flags(self) -> dict:
        c = self.cfg
        return dict(HAS_OLD=self.has_old, HAS_REF=self.has_ref, HAS_DELTA=c.delta is not None,
                    CISPO=c.loss_type == "cispo", SEQ=c.sequence_level, KL_IS=c.kl_bias_correction, KIND=self.kind)

    def _scalars(self) -> tuple:
        c = self.cfg
        return c.beta, c.epsilon_low, c.epsilon_high, c.delta if c.delta is not None else 0.0

    def forward(self, t: _LossTensors) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (row sums [B, ROW], out = [loss, kl, clip low, clip high, clip region, normaliser])."""
        dev = t.lp.device
        rows = torch.empty(self.B, ROW, device=dev, dtype=torch.float32)
        if not self.B:
            return rows, torch.zeros(N_OUT, device=dev, dtype=torch.float32)
        out = torch.empty(N_OUT, device=dev, dtype=torch.float32)
        ticket = torch.zeros(1, device=dev, dtype=torch.int32)
        lp, old, ref, adv, mask = t.pointers()
        _grpo_fwd_kernel[(self.B,)](
            lp, old, ref, adv, mask, rows, out, ticket,
            self.B, self.T, lp.stride(0), old.stride(0), ref.stride(0), mask.stride(0),
            *self._scalars(), self.norm or 0.0, **self._flags(), HAS_NORM=self.norm is not None,
            BLOCK_T=self.block, BLOCK_B=min(next_pow2(self.B), 1024), num_warps=NUM_WARPS,
        )
        return rows, out

    def backward(self, t: _LossTensors, rows, out, g_loss: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """d(logps) [B, T] in `out_dtype`."""
        dlp = torch.empty(self.B, self.T, device=t.lp.device, dtype=out_dtype)
        lp, old, ref, adv, mask = t.pointers()
        if self.B:
            _grpo_bwd_kernel[(self.B,)](
                lp, old, ref, adv, mask, rows, out, g_loss, dlp,
                self.B, self.T, lp.stride(0), old.stride(0), ref.stride(0), mask.stride(0), dlp.stride(0),
                *self._scalars(), **self._flags(), BLOCK_T=self.block, num_warps=NUM_WARPS,
            )
        return dlp

    def backward_to_logits(self, t: _LossTensors, rows, out, g_loss, logit_rows: Rows, lse, inv_temp,
                           inplace) -> torch.Tensor:
        """d(logits) straight from d(loss): each token's d(logp) is recomputed where it is used."""
        logits3 = logit_rows.logits3
        B, T_logits, V = logits3.shape
        dlogits = gradient_buffer(logits3, inplace, logit_rows.tokens)
        lp, old, ref, adv, mask = t.pointers()
        block, warps = _launch_config(V, BWD_BLOCK_V, BWD_WARPS)
        if logit_rows.tokens:
            _grpo_logits_bwd_kernel[(B * T_logits,)](
                logits3, logits3.stride(0), logits3.stride(1), dlogits, dlogits.stride(0), dlogits.stride(1), V,
                logit_rows.index_flat, lse, lp, old, ref, adv, mask, rows, out, g_loss,
                self.B, self.T, T_logits, old.stride(0), ref.stride(0), mask.stride(0),
                *self._scalars(), inv_temp, **self._flags(), BLOCK_V=block, num_warps=warps,
            )
        return dlogits


class GRPOLoss(torch.autograd.Function):
    """The scalar loss (differentiable in logps) and the statistics vector: one launch each way."""

    @staticmethod
    def forward(ctx, logps, old_logps, ref_logps, advantages, mask, cfg, max_completion_length, num_items):
        t = _LossTensors.of(logps, old_logps, ref_logps, advantages, mask)
        launch = _LossLaunch(t, cfg, max_completion_length, num_items)
        rows, out = launch.forward(t)
        ctx.save_for_backward(*t, rows, out)
        ctx.launch, ctx.dtype = launch, logps.dtype
        ctx.mark_non_differentiable(out)
        return out[LOSS].clone(), out

    @staticmethod
    def backward(ctx, g_loss, _g_out):
        *t, rows, out = ctx.saved_tensors
        dlp = ctx.launch.backward(_LossTensors(*t), rows, out, g_loss.contiguous(), ctx.dtype)
        return dlp, None, None, None, None, None, None, None


class GRPOLossFromLogits(torch.autograd.Function):
    """selective_logprobs and GRPOLoss in one node: two launches forward, one backward."""

    @staticmethod
    def forward(ctx, logits, index, old_logps, ref_logps, advantages, mask, temperature, inplace, cfg,
                max_completion_length, num_items, with_entropy):
        inv_temp = 1.0 / temperature
        mask_v = _mask_view(mask)
        logit_rows = as_rows(logits, index)
        logp, lse, ent = logprobs_forward(logit_rows, inv_temp, with_entropy, row_mask=mask_v.reshape(-1))
        t = _LossTensors.of(logp.view(index.shape), old_logps, ref_logps, advantages, mask_v)
        launch = _LossLaunch(t, cfg, max_completion_length, num_items)
        rows, out = launch.forward(t)
        ctx.save_for_backward(logit_rows.logits3, logit_rows.index_flat, lse, *t, rows, out)
        ctx.launch, ctx.meta = launch, (inv_temp, inplace, logits.shape, logit_rows.T)
        ent = ent.view(index.shape) if with_entropy else None  # for logging only: no gradient
        ctx.mark_non_differentiable(out, *([ent] if with_entropy else []))
        return out[LOSS].clone(), out, ent

    @staticmethod
    def backward(ctx, g_loss, _g_out, _g_ent):
        logits3, index_flat, lse, *t, rows, out = ctx.saved_tensors
        inv_temp, inplace, shape, T = ctx.meta
        dlogits = ctx.launch.backward_to_logits(_LossTensors(*t), rows, out, g_loss.contiguous(),
                                                Rows(logits3, index_flat, T), lse, inv_temp, inplace)
        if inplace:
            mark_overwritten(logits3)
        return dlogits.view(shape).detach(), None, None, None, None, None, None, None, None, None, None, None


def _stats(out: torch.Tensor, has_ref: bool) -> dict:
    stats = {"clip_ratio/low_mean": out[LOW], "clip_ratio/high_mean": out[HIGH], "clip_ratio/region_mean": out[REGION]}
    if has_ref:
        stats["kl"] = out[KL]
    return stats


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items: float | torch.Tensor | None = None,
    use_bias_correction_kl: bool = False,
    validate: bool = True,
):
    """GRPO loss on token log-probs [B, T]; returns (scalar loss, stats).

    `old_logps=None` is the on-policy case (ratio exp(logp - logp.detach()) = 1 with gradient);
    `ref_logps=None` requires beta == 0. `mask` [B, T] is bool, or numeric holding only 0 and 1
    (anything else raises ValueError; `validate=False` skips that value check, one host sync for
    a non-bool mask). Loss types: grpo (mean of per-sequence means), bnpo (token mean over the
    batch), dr_grpo (sum / (B * max_completion_length)), dapo and cispo (sum / num_items, the
    global active-token count, default the local one). Stats: `kl` (when ref_logps is given) and
    `clip_ratio/{low,high,region}_mean`, as 0-dim tensors (no host sync).
    `use_bias_correction_kl` weights the KL by the importance ratio (TRL 1.16's option of that name).
    The inputs are saved for backward: editing one in place before backward raises.
    """
    check_loss_inputs(logps, old_logps, ref_logps, advantages, mask, beta, check_values=validate)
    cfg = loss_config(beta, epsilon_low, epsilon_high, delta, loss_type, importance_sampling_level,
                      use_bias_correction_kl, max_completion_length)
    tensors = (logps, old_logps, ref_logps, advantages)
    if not use_triton(*tensors) or any(t is not None and t.dtype not in TRITON_DTYPES for t in tensors):
        return reference.grpo_loss(
            logps, old_logps, ref_logps, advantages, mask, beta=beta, epsilon_low=epsilon_low,
            epsilon_high=epsilon_high, delta=delta, loss_type=loss_type,
            importance_sampling_level=importance_sampling_level,
            max_completion_length=max_completion_length, num_items=num_items,
            use_bias_correction_kl=use_bias_correction_kl, validate=False,
        )
    loss, out = GRPOLoss.apply(logps, old_logps, ref_logps, advantages, mask, cfg, max_completion_length, num_items)
    return loss, _stats(out, ref_logps is not None)


def grpo_loss_from_logits(
    logits: torch.Tensor,
    index: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    inplace_backward: bool | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items: float | torch.Tensor | None = None,
    use_bias_correction_kl: bool = False,
    return_entropy: bool = False,
    validate: bool = True,
):
    """GRPO loss straight from logits; same options and return value as `grpo_loss`.

    `logits` is [B, C+1, V], a causal LM head's output as is (`model(...).logits`, with
    `logits_to_keep=C+1`): position t scores index[:, t] and the last position is skipped, its
    gradient zero. [B, C, V] works too, a strided view such as `out.logits[:, :-1]` included,
    but autograd then zero-fills a full-size copy for the slice's backward.

    `inplace_backward`: None (default) writes d(logits) into the logits buffer only where that
    is safe, when autograd produced the logits (a non-leaf such as the head's output, or a view
    of one: its backward needs d(logits), not the logits), and into a new tensor for a leaf, a
    view of a leaf, or anything else the caller owns. True forces the in-place write (the logits
    hold gradients after backward); False never writes into them. In place, the logits' version
    is bumped, so another op that saved them for its own backward raises rather than misreads.

    `validate=False` skips the index range and mask value checks (host syncs). `return_entropy`
    adds stats["entropy"], the mean entropy of the tempered distribution over the unmasked
    tokens, computed in the same sweep (no gradient; about +20% on the forward). Every tensor the
    backward reads is saved for it: editing one in place before backward raises.
    """
    if validate:
        check_selective_inputs(logits, index, temperature)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V] or [B, T+1, V], got shape {tuple(logits.shape)}")
    options = dict(beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta, loss_type=loss_type,
                   importance_sampling_level=importance_sampling_level,
                   max_completion_length=max_completion_length, num_items=num_items,
                   use_bias_correction_kl=use_bias_correction_kl)
    # The token tensors are checked against a shape-only stand-in for the log-probs.
    check_loss_inputs(torch.empty(index.shape, device="meta"), old_logps, ref_logps, advantages, mask, beta,
                      check_values=validate)
    tensors = (logits, old_logps, ref_logps, advantages)
    if not use_triton(*tensors) or any(t is not None and t.dtype not in TRITON_DTYPES for t in tensors):
        return reference.grpo_loss_from_logits(logits, index, old_logps, ref_logps, advantages, mask,
                                               temperature=temperature, return_entropy=return_entropy,
                                               validate=False, **options)
    cfg = loss_config(beta, epsilon_low, epsilon_high, delta, loss_type, importance_sampling_level,
                      use_bias_correction_kl, max_completion_length)
    inplace = resolve_inplace(logits, inplace_backward)
    loss, out, entropy = GRPOLossFromLogits.apply(logits, index, old_logps, ref_logps, advantages, mask,
                                                  float(temperature), inplace, cfg, max_completion_length,
                                                  num_items, return_entropy)
    stats = _stats(out, ref_logps is not None)
    if return_entropy:
        stats["entropy"] = masked_mean(entropy, mask)
    return loss, stats
