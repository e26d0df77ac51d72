"""Argument checks shared by the kernels and their references.

Every message names the offending argument: these errors reach people wiring the kernels into
their own trainers, and "shape mismatch" alone sends them to a debugger.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64) + FLOAT_DTYPES
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
IS_LEVELS = ("token", "sequence")
SCALES = ("group", "batch", "none")


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (bf16/fp16/fp32/fp64), got {t.dtype}")


def is_shifted(logits: torch.Tensor, index: torch.Tensor) -> bool:
    """True when logits carry one more position than index: a causal LM's [B, C+1, V] head output
    for C completion tokens, whose last position predicts past the completion and is skipped."""
    return (
        index.dim() >= 1
        and logits.dim() == index.dim() + 1
        and logits.shape[-2] == index.shape[-1] + 1
        and logits.shape[:-2] == index.shape[:-1]
    )


def check_selective_inputs(logits: torch.Tensor, index: torch.Tensor, temperature: float) -> None:
    _check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dimension, got shape {tuple(logits.shape)}")
    if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"index must be an int64 (or int32) tensor, got {getattr(index, 'dtype', type(index))}")
    if index.shape != logits.shape[:-1] and not is_shifted(logits, index):
        raise ValueError(
            f"index shape {tuple(index.shape)} must equal logits shape without the vocabulary "
            f"dimension {tuple(logits.shape[:-1])}, or have one position fewer (unshifted logits "
            f"[B, C+1, V] for index [B, C])"
        )
    if index.device != logits.device:
        raise ValueError(f"index is on {index.device} but logits are on {logits.device}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if index.numel():
        # One host sync: an out-of-range id would otherwise read past the row (Triton) or trip a
        # device-side assert that kills the CUDA context (torch.gather).
        lo, hi = torch.aminmax(index)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= logits.shape[-1]:
            raise ValueError(f"index out of range: values span [{lo}, {hi}] but the vocabulary size is {logits.shape[-1]}")


def check_advantage_inputs(rewards: torch.Tensor, group_size: int, scale: str, eps: float) -> None:
    _check_float("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.numel() == 0 or rewards.numel() % group_size:
        raise ValueError(f"group_size {group_size} must divide the number of rewards {rewards.numel()} (and B > 0)")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if scale != "none" and not eps > 0:  # an all-equal group has std 0: 0 / (0 + eps)
        raise ValueError(f"eps must be > 0 with scale={scale!r}: a group whose rewards are all equal has std 0, "
                         f"got {eps!r}")


def check_loss_inputs(logps, old_logps, ref_logps, advantages, mask, beta, check_values: bool = True) -> None:
    _check_float("logps", logps)
    if logps.dim() != 2:
        raise ValueError(f"logps must be 2-D [B, T], got shape {tuple(logps.shape)}")
    for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if t is None:
            continue
        _check_float(name, t)
        if t.shape != logps.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal logps shape {tuple(logps.shape)}")
    _check_float("advantages", advantages)
    if advantages.shape != logps.shape[:1]:
        raise ValueError(f"advantages shape {tuple(advantages.shape)} must be [B] = {tuple(logps.shape[:1])}")
    if not isinstance(mask, torch.Tensor) or mask.shape != logps.shape:
        raise ValueError(f"mask shape {tuple(getattr(mask, 'shape', ()))} must equal logps shape {tuple(logps.shape)}")
    check_mask(mask, check_values)
    if beta != 0.0 and ref_logps is None:
        raise ValueError(f"beta={beta} needs ref_logps (pass beta=0.0 to train without a reference model)")
    if not beta >= 0:  # NaN too
        raise ValueError(f"beta must be >= 0, got {beta}")


def check_mask(mask: torch.Tensor, check_values: bool = True) -> None:
    """A mask selects tokens: bool, or numbers that are all 0 or 1.

    The kernels keep a token where mask != 0 and the reference weights by the value, so a mask of
    0.5s or 2s would make the two disagree silently. Non-bool masks cost one host sync to check.
    """
    if mask.dtype not in MASK_DTYPES:
        raise ValueError(f"mask must be a bool or 0/1 numeric tensor, got {mask.dtype}")
    if check_values and mask.dtype != torch.bool and mask.numel():
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            raise ValueError(f"mask must be boolean or hold only 0 and 1, found {mask[bad].flatten()[0].item()!r}")


def _is_whole(x) -> bool:
    try:
        return int(x) == x and not isinstance(x, bool)
    except (TypeError, ValueError, OverflowError):
        return False


@dataclass(frozen=True)
class LossConfig:
    beta: float
    epsilon_low: float
    epsilon_high: float
    delta: float | None
    loss_type: str
    sequence_level: bool
    kl_bias_correction: bool = False


def loss_config(beta, epsilon_low, epsilon_high, delta, loss_type, importance_sampling_level,
                use_bias_correction_kl=False, max_completion_length=None) -> LossConfig:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IS_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, got {importance_sampling_level!r}")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    # `not x >= 0` rather than `x < 0`: NaN fails every comparison and would pass the latter.
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if not (epsilon_low >= 0 and epsilon_high >= 0):
        raise ValueError(f"epsilon_low/epsilon_high must be >= 0, got {epsilon_low}/{epsilon_high}")
    if delta is not None and not delta > 1.0:
        raise ValueError(f"delta must be > 1 (it caps the importance ratio from above), got {delta}")
    if max_completion_length is not None and not (_is_whole(max_completion_length) and max_completion_length >= 1):
        raise ValueError(f"max_completion_length must be a positive int (dr_grpo's normaliser), got {max_completion_length!r}")
    return LossConfig(
        float(beta), float(epsilon_low), float(epsilon_high), None if delta is None else float(delta),
        loss_type, importance_sampling_level == "sequence", bool(use_bias_correction_kl),
    )


def check_linear_inputs(hidden, weight, index, bias, temperature) -> None:
    """hidden [..., H] (or [B, C+1, H] for ids [B, C]), weight [V, H], bias [V] or None, ids in [0, V)."""
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be [V, H] with V > 0, got shape {tuple(weight.shape)}")
    if hidden.dim() < 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must be [..., H] with H = weight.shape[1] = {weight.shape[1]}, "
                         f"got shape {tuple(hidden.shape)}")
    if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"index must be an int64 (or int32) tensor, got {getattr(index, 'dtype', type(index))}")
    if tuple(index.shape) != tuple(hidden.shape[:-1]) and not is_shifted(hidden, index):
        raise ValueError(f"index shape {tuple(index.shape)} must equal hidden shape without H "
                         f"{tuple(hidden.shape[:-1])}, or have one position fewer ([B, C] ids for [B, C+1, H] hidden)")
    if bias is not None:
        _check_float("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("index", index), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if index.numel():
        # One host sync: an out-of-range id would read past a tile's row or gather garbage.
        lo, hi = torch.aminmax(index)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"index out of range: values span [{lo}, {hi}] but the vocabulary size is {weight.shape[0]}")
