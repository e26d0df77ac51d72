"""The teaching reward and teacher metrics: pure functions of baseline vs guided outcomes.

Per guidance sample, with the student's baseline answer (alone) and its guided answer:

    wrong -> right   improvement + bonus          (1 + bonus by default: the highest score)
    right -> right   both_correct + bonus         (0 + bonus)
    right -> wrong   degradation                  (-1)
    wrong -> wrong   both_wrong                   (0)
    answer in the guidance: leak                  (-1), whatever the student did

    bonus = efficiency * (answer_share * max(0, (baseline_tokens - student_tokens) / baseline_tokens)
                          + (1 - answer_share) * guidance_scale / (guidance_scale + guidance_tokens))

so shorter guidance, and guidance that shortens the student's answer, earn up to `efficiency`
(0.5) more; it never outweighs a change in correctness. The leak rule is what stops a teacher
from learning to hand over the answer: a guidance that contains the ground truth (as a number
equal to it, or as the normalised text) scores below every honest one.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from statistics import fmean, pstdev
from typing import Any, Sequence

from atlas_fast.rewards import (answers_match, completion_text, extract_answer, has_truth, normalize_answer, parse_number,
                                truth_answer)

IMPROVED, DEGRADED, BOTH_CORRECT, BOTH_WRONG = "improved", "degraded", "both_correct", "both_wrong"
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
# LaTeX fractions, -\frac{3}{4} and the brace-less \frac34, read as numbers (sign kept).
_LATEX_FRACTION = re.compile(
    r"([-+]?)\s*\\[dt]?frac\s*(?:\{\s*([-+]?[\d.,]+)\s*\}|(\d))\s*(?:\{\s*([-+]?[\d.,]+)\s*\}|(\d))")
# "Step 2" labels a step, not a quantity, when punctuation closes it ("Step 2:", "in step 2, ...").
_STEP_LABEL = re.compile(r"(?i)\bstep\s+\d+(?=[:.),](?:\s|$)|$)", re.MULTILINE)
# A line opening with "2." or "(2)": a list item when a neighbouring number opens another line.
_LIST_ITEM = re.compile(r"^[ \t]*\(?(\d+)[.)](?=\s)", re.MULTILINE)


@dataclass
class TeachingRewardWeights:
    improvement: float = 1.0  # wrong -> right
    both_correct: float = 0.0  # right -> right (plus the bonus)
    degradation: float = -1.0  # right -> wrong (ATLAS first used 0; a teacher that confuses must pay)
    both_wrong: float = 0.0
    efficiency: float = 0.5  # the largest efficiency bonus
    answer_share: float = 0.5  # share of the bonus for a shorter student answer; the rest for short guidance
    guidance_scale: float = 100.0  # guidance term scale / (scale + tokens): 0.5 at 100 tokens
    leak: float = -1.0  # the guidance contains the answer

    def validate(self) -> None:
        for name in ("improvement", "both_correct", "degradation", "both_wrong", "efficiency", "leak",
                     "answer_share", "guidance_scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"teaching.reward.{name} must be a finite number, got {value!r}")
        if not 0.0 <= self.answer_share <= 1.0:
            raise ValueError(f"teaching.reward.answer_share must be in [0, 1], got {self.answer_share}")
        if self.guidance_scale <= 0 or self.efficiency < 0:
            raise ValueError("teaching.reward.guidance_scale must be > 0 and efficiency >= 0")


def outcome(baseline_correct: bool, guided_correct: bool) -> str:
    if guided_correct:
        return BOTH_CORRECT if baseline_correct else IMPROVED
    return DEGRADED if baseline_correct else BOTH_WRONG


def efficiency_bonus(baseline_tokens: int, student_tokens: int, guidance_tokens: int, w: TeachingRewardWeights) -> float:
    shorter = max(0.0, (baseline_tokens - student_tokens) / baseline_tokens) if baseline_tokens > 0 else 0.0
    brief = w.guidance_scale / (w.guidance_scale + max(guidance_tokens, 0))
    return w.efficiency * (w.answer_share * shorter + (1.0 - w.answer_share) * brief)


def teaching_reward_value(baseline_correct: bool, guided_correct: bool, baseline_tokens: int, student_tokens: int,
                          guidance_tokens: int, leaked: bool, w: TeachingRewardWeights) -> float:
    if leaked:
        return w.leak
    kind = outcome(baseline_correct, guided_correct)
    if kind == DEGRADED:
        return w.degradation
    if kind == BOTH_WRONG:
        return w.both_wrong
    base = w.improvement if kind == IMPROVED else w.both_correct
    return base + efficiency_bonus(baseline_tokens, student_tokens, guidance_tokens, w)


def answer_leaked(guidance: str, truth: Any) -> bool:
    """True when `guidance` states the ground truth: a number in it equal to a numeric truth, or
    the normalised truth text as a whole word. Truths are ambiguous below two characters ("1"
    appears in any hint), so a numeric truth is matched as a number, never as a substring.
    Numbers include LaTeX fractions; labels ("Step 2:", the items of a numbered list) are not quantities."""
    if truth is None:
        return False
    answer = truth_answer(truth)  # a GSM8K / MATH solution's final answer, not its working
    quantities = _without_labels(_LATEX_FRACTION.sub(_fraction_text, guidance))
    truths = answer if isinstance(answer, list) else [answer]
    for t in truths:
        text = str(t).strip()
        value = parse_number(text)
        if value is not None:
            if any(parse_number(n.replace(",", "")) == value for n in _NUMBER.findall(quantities)):
                return True
            continue
        norm = normalize_answer(text)
        if len(norm) >= 2 and re.search(rf"(?<!\w){re.escape(norm)}(?!\w)", normalize_answer(guidance)):
            return True
    return False


def _fraction_text(m: re.Match) -> str:
    value = parse_number(f"{m[1]}\\frac{{{m[2] or m[3]}}}{{{m[4] or m[5]}}}")  # the brace-less form, braced
    return m[0] if value is None else f" {value.numerator}/{value.denominator} "


def _without_labels(text: str) -> str:
    """`text` less the numbers that label steps and list items rather than state quantities."""
    text = _STEP_LABEL.sub("step", text)
    items = {int(m[1]) for m in _LIST_ITEM.finditer(text)}
    return _LIST_ITEM.sub(lambda m: " " if {int(m[1]) - 1, int(m[1]) + 1} & items else m[0], text)


def is_correct(answer_text: str, truth: Any) -> bool:
    return answers_match(extract_answer(answer_text), truth_answer(truth)) if truth is not None else False


class TeachingReward:
    """The teaching reward as a TRL-style reward function over the columns TeacherGRPOTrainer adds:
    baseline_answer, student_answer (guided), guidance, and their token counts."""

    __name__ = "teaching_reward"

    def __init__(self, weights: TeachingRewardWeights | None = None):
        self.weights = weights or TeachingRewardWeights()
        self.weights.validate()

    # The protocol's columns arrive with the rollout, not with the dataset, so they are read from
    # **columns (a trainer's up-front check of dataset columns must not ask the dataset for them).
    COLUMNS = ("ground_truth", "baseline_answer", "student_answer", "guidance", "baseline_tokens", "student_tokens",
               "guidance_tokens")

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        missing = [k for k in self.COLUMNS if k not in columns]
        if missing:
            raise ValueError(f"teaching_reward needs the column(s) {missing}: TeacherGRPOTrainer adds all but "
                             "ground_truth, which the dataset must hold")
        ground_truth, baseline_answer, student_answer, guidance, baseline_tokens, student_tokens, guidance_tokens = (
            columns[k] for k in self.COLUMNS)
        out: list[float | None] = []
        for i, truth in enumerate(ground_truth):
            if not has_truth(truth):
                out.append(None)  # no ground truth, no opinion
                continue
            out.append(teaching_reward_value(
                is_correct(completion_text(baseline_answer[i]), truth), is_correct(completion_text(student_answer[i]), truth),
                int(baseline_tokens[i]), int(student_tokens[i]), int(guidance_tokens[i]),
                answer_leaked(completion_text(guidance[i]), truth), self.weights))
        return out


def grade_labelled(truths: Sequence[Any] | None, baseline_answers: Sequence[str], guided_answers: Sequence[str]
                   ) -> tuple[list[int], list[bool], list[bool]]:
    """The rows that have a ground truth (unlabelled ones are graded by nothing), and whether each
    one's baseline and guided answers are correct: what teacher_metrics takes."""
    rows = [k for k, y in enumerate(truths or ()) if has_truth(y)]
    return (rows, [is_correct(baseline_answers[k], truths[k]) for k in rows],
            [is_correct(guided_answers[k], truths[k]) for k in rows])


def teacher_metrics(baseline_correct: Sequence[bool], guided_correct: Sequence[bool], guidance_tokens: Sequence[int],
                    baseline_tokens: Sequence[int], student_tokens: Sequence[int]) -> dict[str, float]:
    """ATLAS's teacher metrics over guided samples (each compared with its problem's baseline).

    token_efficiency is the relative cut in the student's answer length that guidance buys,
    1 - mean(guided answer tokens) / mean(baseline answer tokens) (ATLAS reports -37% tokens)."""
    n = len(guided_correct)
    if n == 0:
        return {}
    kinds = [outcome(b, g) for b, g in zip(baseline_correct, guided_correct)]
    student_acc = sum(guided_correct) / n
    baseline_acc = sum(baseline_correct) / n
    mean_base = fmean(baseline_tokens) if baseline_tokens else 0.0
    return {
        "student_accuracy": student_acc,
        "baseline_accuracy": baseline_acc,
        "accuracy_delta": student_acc - baseline_acc,
        "improvement_rate": kinds.count(IMPROVED) / n,
        "degradation_rate": kinds.count(DEGRADED) / n,
        "teaching_length_mean": fmean(guidance_tokens),
        "teaching_length_std": pstdev(guidance_tokens) if n > 1 else 0.0,
        "token_efficiency": 1.0 - fmean(student_tokens) / mean_base if mean_base > 0 else 0.0,
    }
