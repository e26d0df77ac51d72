"""What a diagnostic probe tells the teacher: `DiagnosticResult`, how it is estimated, and tiers.

The estimate combines two independent views of the student's probe answer:

- the student's own certainty: the geometric mean of the probabilities its sampler gave the
  tokens of its (greedy) probe answer, `s = exp(mean log p)`. A student that knows how to
  proceed writes its plan with confident tokens; a guessing one spreads its probability.
- the teacher's rating of the probe on a 1-5 scale, read from the teacher's next-token
  distribution after the rating prompt, restricted to the tokens "1".."5": the expected rating
  `E[k] = sum_k k p(k) / sum_k p(k)`, mapped to [0, 1] and shrunk toward 0.5 by the mass `m`
  the teacher put on those five tokens: `r = m (E[k] - 1) / 4 + (1 - m) / 2`. This is the reply a
  one-token greedy generation would parse (its argmax), without the parsing failures, and it is
  smooth in the teacher's weights.

    capability_level = w * s + (1 - w) * r                     (w = student_weight, 0.5 by default)
    confidence_score = (1 - |s - r|) * rating_mass * (0.5 if the probe was truncated else 1)

where `rating_mass` (m) is the share of the teacher's next-token probability on the five rating
tokens (a teacher that would not answer with a digit gives a rating we should not trust). Both
are in [0, 1]. Greedy decoding and a forward pass are deterministic, so the result is too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

LOW, MEDIUM, HIGH = "low", "medium", "high"
TIERS = (LOW, MEDIUM, HIGH)
LOW_BELOW = 0.3  # capability < 0.3: step-by-step walkthrough
HIGH_FROM = 0.7  # capability >= 0.7: minimal guidance or verification


@dataclass
class DiagnosticResult:
    """The teacher's assessment of the student from one diagnostic probe."""

    capability_level: float  # 0.0-1.0: how well the student can solve the task alone
    confidence_score: float  # 0.0-1.0: how much the assessment can be trusted
    identified_gaps: list[str] = field(default_factory=list)  # specific weaknesses seen in the probe
    response_quality: dict[str, float] = field(default_factory=dict)  # metrics of the probe answer
    probe_tokens: int = 0  # tokens the student spent on the probe
    probe: str = ""  # the student's probe answer, which the guidance prompt quotes

    def __post_init__(self) -> None:
        for name in ("capability_level", "confidence_score"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0 or math.isnan(value):
                raise ValueError(f"DiagnosticResult.{name} must be in [0, 1], got {value!r}")
        if not isinstance(self.probe_tokens, int) or self.probe_tokens < 0:
            raise ValueError(f"DiagnosticResult.probe_tokens must be a non-negative int, got {self.probe_tokens!r}")

    @property
    def tier(self) -> str:
        return capability_tier(self.capability_level)


def capability_tier(capability: float) -> str:
    """low (< 0.3): step-by-step walkthrough; medium (0.3-0.7): hints; high (>= 0.7): verification."""
    if capability < LOW_BELOW:
        return LOW
    if capability < HIGH_FROM:
        return MEDIUM
    return HIGH


def expected_rating(digit_probs: Sequence[float]) -> tuple[float, float]:
    """(E[k] over k = 1..5 renormalised, probability mass on the five digits)."""
    mass = float(sum(digit_probs))
    if mass <= 0 or not math.isfinite(mass):
        return 3.0, 0.0  # no opinion: the middle of the scale, with no weight
    return sum((k + 1) * p for k, p in enumerate(digit_probs)) / mass, min(mass, 1.0)


def assess_probe(
    probe_logprobs: Sequence[float],
    probe_finished: bool,
    rating_digit_probs: Sequence[float],
    probe: str = "",
    *,
    student_weight: float = 0.5,
) -> DiagnosticResult:
    """The DiagnosticResult of one probe: the student's token log-probs over its probe answer,
    whether it ended before the token limit, and the teacher's probabilities of "1".."5"."""
    n = len(probe_logprobs)
    certainty = math.exp(sum(probe_logprobs) / n) if n else 0.0  # geometric mean token probability
    weakest = math.exp(min(probe_logprobs)) if n else 0.0
    rating, mass = expected_rating(rating_digit_probs)
    # A teacher that would not reply with a digit has no opinion: shrink its rating toward the
    # middle of the scale by the probability mass it put on the digits.
    rated = mass * (rating - 1.0) / 4.0 + (1.0 - mass) * 0.5
    capability = student_weight * certainty + (1.0 - student_weight) * rated
    confidence = (1.0 - abs(certainty - rated)) * mass * (1.0 if probe_finished else 0.5)
    gaps: list[str] = []
    if not probe.strip():
        gaps.append("empty probe: the student gave no approach")
    if not probe_finished:
        gaps.append("probe truncated: the student did not finish its approach")
    if n and certainty < 0.5:
        gaps.append("unsure: the student's own token probabilities are low")
    if rating < 2.5 and mass > 0:
        gaps.append("weak approach: the teacher rated the probe below 2.5 of 5")
    return DiagnosticResult(
        capability_level=_unit(capability),
        confidence_score=_unit(confidence),
        identified_gaps=gaps,
        response_quality={
            "mean_token_prob": certainty,
            "min_token_prob": weakest,
            "teacher_rating": rating,
            "rating_prob_mass": mass,
            "finished": float(probe_finished),
            "length": float(n),
        },
        probe_tokens=n,
        probe=probe,
    )


def _unit(x: float) -> float:
    return min(1.0, max(0.0, float(x))) if math.isfinite(x) else 0.0
