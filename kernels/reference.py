"""Plain-PyTorch versions of every atlas_kernels op: the executable specification.

Each function has the same signature and semantics as its Triton twin. They run on any
device and dtype (float64 included), which makes them the CPU fallback, the eager baseline in
the benchmarks and the float64 oracle in the tests. They favour clarity over memory: the
log-prob reference materialises a float32 copy of the logits, which the kernels never do.
"""
from __future__ import annotations

import torch

from ._validation import (
    check_advantage_inputs,
    check_loss_inputs,
    check_linear_inputs,
    check_selective_inputs,
    is_shifted,
    loss_config,
)

__all__ = ["selective_logprobs", "group_advantages", "grpo_loss", "grpo_loss_from_logits", "kl_k3",
           "fused_linear_logprobs", "fused_linear_grpo_loss"]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def selective_logprobs(
    logits: torch.Tensor,
    index: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    inplace_backward: bool | None = None,
    validate: bool = True,
):
    """log_softmax(logits / temperature) gathered at `index`, and optionally the entropy.

    Logits one position longer than index ([B, C+1, V] for [B, C]) are a causal LM's unshifted
    output: the last position is dropped (a slice, so its gradient is zero).
    """
    del inplace_backward  # autograd owns the buffers here
    if validate:
        check_selective_inputs(logits, index, temperature)
    if is_shifted(logits, index):
        logits = logits[..., :-1, :]
    x = logits.to(_compute_dtype(logits)) / temperature  # [..., V]
    lse = torch.logsumexp(x, dim=-1)  # [...]
    logp = x.gather(-1, index.unsqueeze(-1)).squeeze(-1) - lse
    # Rounding can push a near-certain token a hair above zero; a log-prob never is.
    logp = logp.clamp(max=0.0)
    if not return_entropy:
        return logp
    p = torch.softmax(x, dim=-1)
    # 0 * -inf is NaN, forward and (through a where over the product) backward: zero-probability
    # tokens leave the product with their logit replaced by 0, so they add nothing either way.
    px = p * torch.where(p > 0, x, torch.zeros_like(x))
    entropy = lse - px.sum(-1)
    return logp, entropy


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4):
    """Group-relative advantages.

    Returns (advantages [B], mean [B/G], std [B/G]). NaN rewards are missing samples: they are
    left out of every statistic and get advantage 0. A group with fewer than two valid rewards has
    std 0 (a Bessel-corrected std is undefined there), and one with none has mean 0.
    """
    check_advantage_inputs(rewards, group_size, scale, eps)
    r = rewards.to(_compute_dtype(rewards)).reshape(-1, group_size)  # [NG, G]
    valid = ~torch.isnan(r)
    r0 = torch.where(valid, r, torch.zeros_like(r))
    n = valid.sum(-1).to(r.dtype)  # [NG]
    mean = r0.sum(-1) / n.clamp(min=1)
    dev = torch.where(valid, r - mean[:, None], torch.zeros_like(r))
    std = _bessel_std((dev * dev).sum(-1), n)
    if scale == "group":
        adv = dev / (std[:, None] + eps)
    elif scale == "batch":
        n_all = n.sum()
        batch_mean = r0.sum() / n_all.clamp(min=1)
        bdev = torch.where(valid, r - batch_mean, torch.zeros_like(r))
        adv = dev / (_bessel_std((bdev * bdev).sum(), n_all) + eps)
    else:
        adv = dev
    return adv.reshape(-1), mean, std


def _bessel_std(sum_sq: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    var = sum_sq / (n - 1).clamp(min=1)
    # sqrt has an infinite slope at 0; all-equal groups would turn gradients into NaN.
    safe = torch.where(var > 0, var, torch.ones_like(var))
    return torch.where((var > 0) & (n > 1), safe.sqrt(), torch.zeros_like(var))


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): exp(d) - d - 1 with d = ref - logp."""
    if logps.shape != ref_logps.shape:
        raise ValueError(f"ref_logps shape {tuple(ref_logps.shape)} != logps shape {tuple(logps.shape)}")
    d = ref_logps.to(_compute_dtype(logps)) - logps.to(_compute_dtype(logps))
    return torch.exp(d) - d - 1


def per_token_loss(logps, old_logps, ref_logps, advantages, mask, cfg):
    """Per-token GRPO loss [B, T], the ratio [B, T] (for clip statistics) and the k3 KL (or None)."""
    dt = _compute_dtype(logps)
    keep = mask.bool()
    # Padding may hold anything (-inf, junk); zero it before exp() can turn it into NaN.
    lp = torch.where(keep, logps.to(dt), 0.0)
    m = keep.to(dt)
    # The old and reference log-probs are constants of the loss, as in the kernels: no gradient
    # reaches them (or, through them, the policy), whether or not the caller detached them.
    old = lp.detach() if old_logps is None else torch.where(keep, old_logps.detach().to(dt), 0.0)
    ref_logps = None if ref_logps is None else torch.where(keep, ref_logps.detach().to(dt), 0.0)
    log_ratio = lp - old
    if cfg.sequence_level:
        # GSPO: one importance weight per sequence, the length-normalised sum of token log-ratios.
        log_ratio = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
    ratio = torch.exp(log_ratio).expand_as(lp)
    a = advantages.to(dt)[:, None]
    if cfg.loss_type == "cispo":
        loss = -torch.clamp(ratio, max=cfg.epsilon_high).detach() * a * lp
    else:
        clipped = torch.clamp(ratio, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
        unclipped = ratio if cfg.delta is None else torch.clamp(ratio, max=cfg.delta)
        loss = -torch.min(unclipped * a, clipped * a)
    kl = None if ref_logps is None else kl_k3(lp, ref_logps)
    if kl is not None and cfg.kl_bias_correction:
        kl = kl * ratio  # importance-weighted KL; the ratio keeps its gradient
    if cfg.beta != 0.0:
        loss = loss + cfg.beta * kl
    return loss, ratio, kl


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
    """Clipped-surrogate GRPO loss with optional k3 KL; returns (loss, stats). The mask is bool
    or 0/1 (checked unless validate=False); it weights tokens by its value."""
    check_loss_inputs(logps, old_logps, ref_logps, advantages, mask, beta, check_values=validate)
    cfg = loss_config(beta, epsilon_low, epsilon_high, delta, loss_type, importance_sampling_level,
                      use_bias_correction_kl, max_completion_length)
    loss_tok, ratio, kl = per_token_loss(logps, old_logps, ref_logps, advantages, mask, cfg)
    m = mask.to(loss_tok.dtype)
    row_sums = (loss_tok * m).sum(-1)  # [B]
    row_tokens = m.sum(-1)  # [B]
    loss = aggregate(row_sums, row_tokens, cfg.loss_type, logps.shape[-1], max_completion_length, num_items)

    with torch.no_grad():
        a = advantages.to(ratio.dtype)[:, None]
        low = ((ratio < 1 - cfg.epsilon_low) & (a < 0)).to(m.dtype)
        high = ((ratio > 1 + cfg.epsilon_high) & (a > 0)).to(m.dtype)
        ntok = m.sum().clamp(min=1)
        stats = {
            "clip_ratio/low_mean": (low * m).sum() / ntok,
            "clip_ratio/high_mean": (high * m).sum() / ntok,
            "clip_ratio/region_mean": (((low + high) > 0).to(m.dtype) * m).sum() / ntok,
        }
        if kl is not None:
            stats["kl"] = (kl * m).sum() / ntok
    return loss, stats


def aggregate(row_sums, row_tokens, loss_type, seq_len, max_completion_length, num_items):
    """Turn per-sequence sums of masked token losses into the scalar each loss type defines."""
    batch = row_sums.shape[0]
    if loss_type == "grpo":  # an empty batch (or rows of no tokens) is a loss of 0, as in the kernels
        return (row_sums / row_tokens.clamp(min=1)).sum() / max(batch, 1)
    if loss_type == "dr_grpo":
        return row_sums.sum() / max(batch * (max_completion_length or seq_len), 1)
    # bnpo, dapo and cispo normalise by a token count; the caller may supply the global one.
    tokens = row_tokens.sum() if num_items is None else torch.as_tensor(num_items, dtype=row_sums.dtype)
    return row_sums.sum() / tokens.to(row_sums.device).clamp(min=1)


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
    return_entropy: bool = False,
    validate: bool = True,
    **loss_options,
):
    """GRPO loss straight from logits [B, C, V] or unshifted [B, C+1, V]: selective_logprobs
    followed by grpo_loss."""
    out = selective_logprobs(logits, index, temperature=temperature, inplace_backward=inplace_backward,
                             return_entropy=return_entropy, validate=validate)
    logps, entropy = out if return_entropy else (out, None)
    loss, stats = grpo_loss(logps, old_logps, ref_logps, advantages, mask, validate=validate, **loss_options)
    if return_entropy:
        stats["entropy"] = masked_mean(entropy.detach(), mask)
    return loss, stats


def linear_logits(hidden: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, bias=None) -> torch.Tensor:
    """hidden @ weight.T + bias for the positions that score `index` (a [B, C+1, H] hidden drops its last)."""
    if is_shifted(hidden, index):
        hidden = hidden[..., :-1, :]
    return torch.nn.functional.linear(hidden, weight, bias)


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    validate: bool = True,
    chunk_tokens: int | None = None,
    vocab_tile: int | None = None,
    workspace_bytes: int | None = None,
):
    """selective_logprobs of the LM head's logits (materialised here; the kernel never does)."""
    del chunk_tokens, vocab_tile, workspace_bytes  # how the kernel cuts the work
    if validate:
        check_linear_inputs(hidden, weight, index, bias, temperature)
    return selective_logprobs(linear_logits(hidden, weight, index, bias), index, temperature=temperature,
                              return_entropy=return_entropy, validate=False)


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    validate: bool = True,
    chunk_tokens: int | None = None,
    vocab_tile: int | None = None,
    workspace_bytes: int | None = None,
    **loss_options,
):
    """grpo_loss_from_logits of the LM head's logits [B, C, V]."""
    del chunk_tokens, vocab_tile, workspace_bytes
    if validate:
        check_linear_inputs(hidden, weight, index, bias, temperature)
    return grpo_loss_from_logits(linear_logits(hidden, weight, index, bias), index, old_logps, ref_logps,
                                 advantages, mask, temperature=temperature, return_entropy=return_entropy,
                                 validate=validate, **loss_options)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Llama/Qwen/Mistral RMSNorm: weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype)."""
    h = x.to(torch.float32) if x.dtype != torch.float64 else x
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """A SwiGLU MLP's middle: silu(gate) * up, each rounded to the inputs' dtype as PyTorch does."""
    return torch.nn.functional.silu(gate) * up


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb for q [B, Hq, T, D], k [B, Hkv, T, D], cos/sin [B or 1, T, D]."""
    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
