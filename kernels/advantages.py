"""Group-relative advantages: (r - group mean) / (std + eps), NaN-aware, forward and backward.

The eager version is a dozen tiny launches over [B/G, G]; here it is one. Each program owns a
[GROUPS, G] tile. With scale="batch" the std spans every group, so a single program walks all
tiles (two sweeps: batch mean, then squared deviations); B is at most a few thousand rewards
per step, which one program handles in microseconds.

Rewards are rarely differentiable, but a learned reward model can be, so the backward exists:
with dev = r - mean and S = sum_i g_i dev_i over the valid entries of the group,
    dr_j = (g_j - mean(g)) / (std + eps) - dev_j * S / ((n - 1) * std * (std + eps)^2)
and, for scale="batch", the second term uses the batch std, batch deviations and batch S.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import TRITON_DTYPES, next_pow2, use_triton
from ._validation import check_advantage_inputs

GROUP = 0
BATCH = 1
NONE = 2
_SCALE_IDS = {"group": GROUP, "batch": BATCH, "none": NONE}
TILE_ELEMS = 2048  # rewards per program tile; B=1024 fits one tile


@triton.jit
def _tile(r_ptr, tile, n_groups, G, GROUPS: tl.constexpr, G_P: tl.constexpr):
    gi = tile * GROUPS + tl.arange(0, GROUPS)[:, None]  # [GROUPS, 1]
    gj = tl.arange(0, G_P)[None, :]  # [1, G_P]
    inb = (gi < n_groups) & (gj < G)
    offs = gi * G + gj
    r = tl.load(r_ptr + offs, mask=inb, other=float("nan")).to(tl.float32)
    valid = (r == r) & inb  # NaN != NaN
    return offs, inb, valid, tl.where(valid, r, 0.0)


@triton.jit
def _group_stats(valid, r0):
    n = tl.sum(valid.to(tl.float32), axis=1)  # [GROUPS]
    mean = tl.sum(r0, axis=1) / tl.maximum(n, 1.0)
    dev = tl.where(valid, r0 - mean[:, None], 0.0)
    var = tl.sum(dev * dev, axis=1) / tl.maximum(n - 1.0, 1.0)
    std = tl.where((n > 1.0) & (var > 0.0), tl.sqrt(var), 0.0)
    return n, mean, dev, std


@triton.jit
def _batch_stats(r_ptr, n_groups, G, n_tiles, GROUPS: tl.constexpr, G_P: tl.constexpr):
    """Batch mean (pass 1) and Bessel-corrected batch std (pass 2) over all valid rewards."""
    total = tl.full([], 0.0, tl.float32)
    count = tl.full([], 0.0, tl.float32)
    for tile in range(0, n_tiles):
        _, _, valid, r0 = _tile(r_ptr, tile, n_groups, G, GROUPS, G_P)
        total += tl.sum(tl.sum(r0, axis=1), axis=0)
        count += tl.sum(tl.sum(valid.to(tl.float32), axis=1), axis=0)
    bmean = total / tl.maximum(count, 1.0)
    sq = tl.full([], 0.0, tl.float32)
    for tile in range(0, n_tiles):
        _, _, valid, r0 = _tile(r_ptr, tile, n_groups, G, GROUPS, G_P)
        d = tl.where(valid, r0 - bmean, 0.0)
        sq += tl.sum(tl.sum(d * d, axis=1), axis=0)
    var = sq / tl.maximum(count - 1.0, 1.0)
    bstd = tl.where((count > 1.0) & (var > 0.0), tl.sqrt(var), 0.0)
    return count, bmean, bstd


@triton.jit
def _advantages_fwd_kernel(r_ptr, adv_ptr, mean_ptr, std_ptr, n_groups, G, n_tiles, eps,
                           SCALE: tl.constexpr, GROUPS: tl.constexpr, G_P: tl.constexpr):
    first = tl.program_id(0)
    step = tl.num_programs(0)
    denom = 1.0
    if SCALE == 1:
        _, _, bstd = _batch_stats(r_ptr, n_groups, G, n_tiles, GROUPS, G_P)
        denom = bstd + eps
    for tile in range(first, n_tiles, step):
        offs, inb, valid, r0 = _tile(r_ptr, tile, n_groups, G, GROUPS, G_P)
        n, mean, dev, std = _group_stats(valid, r0)
        gi = tile * GROUPS + tl.arange(0, GROUPS)
        tl.store(mean_ptr + gi, mean, mask=gi < n_groups)
        tl.store(std_ptr + gi, std, mask=gi < n_groups)
        if SCALE == 0:
            adv = dev / (std[:, None] + eps)
        elif SCALE == 1:
            adv = dev / denom
        else:
            adv = dev
        tl.store(adv_ptr + offs, adv, mask=inb)


@triton.jit
def _advantages_bwd_kernel(r_ptr, g_ptr, dr_ptr, n_groups, G, n_tiles, eps,
                           SCALE: tl.constexpr, GROUPS: tl.constexpr, G_P: tl.constexpr):
    first = tl.program_id(0)
    step = tl.num_programs(0)
    coef = 0.0
    bmean = 0.0
    bdenom = 1.0
    if SCALE == 1:
        count, bmean, bstd = _batch_stats(r_ptr, n_groups, G, n_tiles, GROUPS, G_P)
        s_all = tl.full([], 0.0, tl.float32)
        for tile in range(0, n_tiles):
            offs, inb, valid, r0 = _tile(r_ptr, tile, n_groups, G, GROUPS, G_P)
            _, _, dev, _ = _group_stats(valid, r0)
            g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
            s_all += tl.sum(tl.sum(tl.where(valid, g * dev, 0.0), axis=1), axis=0)
        bdenom = bstd + eps
        coef = tl.where(bstd > 0.0, s_all / (tl.maximum(count - 1.0, 1.0) * tl.maximum(bstd, 1e-30) * bdenom * bdenom), 0.0)
    for tile in range(first, n_tiles, step):
        offs, inb, valid, r0 = _tile(r_ptr, tile, n_groups, G, GROUPS, G_P)
        n, mean, dev, std = _group_stats(valid, r0)
        g = tl.where(valid, tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
        g_centred = g - (tl.sum(g, axis=1) / tl.maximum(n, 1.0))[:, None]
        if SCALE == 0:
            s = tl.sum(g * dev, axis=1)
            den = std + eps
            # std > 0 implies n > 1; the clamps only keep the untaken branch finite.
            c = tl.where(std > 0.0, s / (tl.maximum(n - 1.0, 1.0) * tl.maximum(std, 1e-30) * den * den), 0.0)
            dr = g_centred / den[:, None] - dev * c[:, None]
        elif SCALE == 1:
            bdev = tl.where(valid, r0 - bmean, 0.0)
            dr = g_centred / bdenom - bdev * coef
        else:
            dr = g_centred
        tl.store(dr_ptr + offs, tl.where(valid, dr, 0.0), mask=inb)


def _launch_shape(n_rewards: int, group_size: int, scale: int):
    g_p = next_pow2(group_size)
    groups = max(1, min(next_pow2(max(1, TILE_ELEMS // g_p)), next_pow2(n_rewards // group_size)))
    n_groups = n_rewards // group_size
    n_tiles = triton.cdiv(n_groups, groups)
    # The batch std is global: one program walks every tile rather than syncing programs.
    grid = 1 if scale == BATCH else n_tiles
    return g_p, groups, n_groups, n_tiles, grid


class GroupAdvantages(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rewards, group_size, scale, eps):
        r = rewards.contiguous()
        scale_id = _SCALE_IDS[scale]
        g_p, groups, n_groups, n_tiles, grid = _launch_shape(r.numel(), group_size, scale_id)
        adv = torch.empty(r.shape, device=r.device, dtype=torch.float32)
        mean = torch.empty(n_groups, device=r.device, dtype=torch.float32)
        std = torch.empty_like(mean)
        _advantages_fwd_kernel[(grid,)](r, adv, mean, std, n_groups, group_size, n_tiles, eps,
                                        SCALE=scale_id, GROUPS=groups, G_P=g_p)
        ctx.save_for_backward(r)
        ctx.meta = (group_size, scale_id, eps, rewards.dtype)
        ctx.mark_non_differentiable(mean, std)
        return adv, mean, std

    @staticmethod
    def backward(ctx, g_adv, _g_mean, _g_std):
        (r,) = ctx.saved_tensors
        group_size, scale_id, eps, dtype = ctx.meta
        g_p, groups, n_groups, n_tiles, grid = _launch_shape(r.numel(), group_size, scale_id)
        dr = torch.empty(r.shape, device=r.device, dtype=torch.float32)
        _advantages_bwd_kernel[(grid,)](r, g_adv.contiguous(), dr, n_groups, group_size, n_tiles, eps,
                                        SCALE=scale_id, GROUPS=groups, G_P=g_p)
        return dr.to(dtype), None, None, None


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4):
    """Advantages [B] plus per-group mean and std [B / group_size], all float32.

    `scale`: "group" divides by each group's std, "batch" by the std of the whole batch (around
    the batch mean), "none" only centres. The std is Bessel-corrected over the valid (non-NaN)
    rewards; NaN rewards get advantage 0, as does every member of a group with no valid reward.
    """
    check_advantage_inputs(rewards, group_size, scale, eps)
    if not use_triton(rewards) or rewards.dtype not in TRITON_DTYPES:
        return reference.group_advantages(rewards, group_size, scale=scale, eps=eps)
    return GroupAdvantages.apply(rewards, group_size, scale, float(eps))
