"""The built-in `accuracy` and `format` rewards: pure functions of (prompt, completion, fields)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from atlas_fast.rewards.answers import answers_match, completion_text, extract_answer, has_truth, truth_answer

__all__ = ["BUILTIN_REWARDS", "accuracy_reward", "format_reward", "make_format_reward"]

def accuracy_reward(
    prompts: Sequence[Any], completions: Sequence[Any], ground_truth: Sequence[Any], **kwargs: Any
) -> list[float | None]:
    """1.0 when the completion's extracted answer matches `ground_truth`, else 0.0; None (no
    reward) for a sample without a ground truth."""
    rewards: list[float | None] = []
    for completion, truth in zip(completions, ground_truth, strict=True):
        if not has_truth(truth):
            rewards.append(None)
            continue
        pred = extract_answer(completion_text(completion))
        rewards.append(1.0 if answers_match(pred, truth_answer(truth)) else 0.0)
    return rewards


_TAG_NAME = re.compile(r"[A-Za-z][\w-]*")


def make_format_reward(
    tags: Sequence[str] | str = ("solution",), *, name: str = "format_reward"
) -> Callable[..., list[float]]:
    """A reward of 1.0 when every tag in `tags` appears as well-formed, non-empty pairs
    (`<tag>...</tag>`, opened before closed, never nested in itself, none left open), else 0.0."""
    tags = (tags,) if isinstance(tags, str) else tuple(tags)
    if not tags or not all(isinstance(t, str) and _TAG_NAME.fullmatch(t) for t in tags):
        raise ValueError(
            f"tags must be a non-empty list of tag names like 'solution'; got {tags!r}."
        )
    patterns = [re.compile(rf"<(/?){re.escape(tag)}>", re.IGNORECASE) for tag in tags]

    def reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return [
            1.0 if all(_well_formed(completion_text(c), p) for p in patterns) else 0.0
            for c in completions
        ]

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = f"1.0 when the completion has well-formed <{'>, <'.join(tags)}> sections."
    reward.tags = tags  # type: ignore[attr-defined]
    return reward


def _well_formed(text: str, pattern: re.Pattern[str]) -> bool:
    open_at: int | None = None
    pairs = 0
    for match in pattern.finditer(text):
        closing = bool(match.group(1))
        if closing == (open_at is None):  # a close without an open, or an open inside an open
            return False
        if closing:
            if not text[open_at : match.start()].strip():  # an empty section is not an answer
                return False
            pairs += 1
            open_at = None
        else:
            open_at = match.end()
    return pairs > 0 and open_at is None


format_reward = make_format_reward()

BUILTIN_REWARDS: dict[str, Callable[..., list[float | None]]] = {"accuracy": accuracy_reward, "format": format_reward}
