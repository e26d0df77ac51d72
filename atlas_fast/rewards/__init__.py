"""Reward functions: resolving them from config, calling them, and combining their scores.

The API is TRL's: a reward function is called with keyword arguments
`f(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns)` where `columns`
are the other dataset columns, repeated per generation, and returns one `float | None` per
completion. `None` means "no opinion" (e.g. a math reward on a code sample) and becomes NaN, which
`combine_rewards` and `reward_metrics` skip. `async def` functions run concurrently with each other
on one background event loop.

Modules: `builtin` (the `accuracy` / `format` rewards), `answers` (answer extraction and
normalisation), `runner` (resolution, sync/async calling, weights, metrics), `reward_model`
(a sequence-classification model as a reward), `rim` (`RIMReward`: a panel of LLM judges).
"""

from __future__ import annotations

from atlas_fast.rewards.answers import (
    answers_match,
    completion_text,
    extract_answer,
    has_truth,
    normalize_answer,
    parse_number,
    truth_answer,
)
from atlas_fast.rewards.builtin import (
    BUILTIN_REWARDS,
    accuracy_reward,
    format_reward,
    make_format_reward,
)
from atlas_fast.rewards.reward_model import RewardModel
from atlas_fast.rewards.runner import (
    RewardFunc,
    append_reward_tables,
    combine_rewards,
    compute_rewards,
    prepare_reward_funcs,
    resolve_reward_func,
    reward_func_name,
    reward_metrics,
    reward_reports,
)

__all__ = [
    "BUILTIN_REWARDS",
    "RIMReward",
    "RewardFunc",
    "RewardModel",
    "append_reward_tables",
    "accuracy_reward",
    "answers_match",
    "combine_rewards",
    "completion_text",
    "compute_rewards",
    "extract_answer",
    "format_reward",
    "has_truth",
    "make_format_reward",
    "normalize_answer",
    "parse_number",
    "truth_answer",
    "prepare_reward_funcs",
    "resolve_reward_func",
    "reward_func_name",
    "reward_metrics",
    "reward_reports",
]


def __getattr__(name: str):
    # The judge panel (HTTP clients, YAML configs) loads on first use, not with every reward.
    if name == "RIMReward":
        from atlas_fast.rewards.rim import RIMReward

        return RIMReward
    raise AttributeError(f"module 'atlas_fast.rewards' has no attribute {name!r}")
