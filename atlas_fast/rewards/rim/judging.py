"""RIM's decisions, as pure functions: when tier 1 escalates, which tier-1 sample stands, the
cross-judge consistency rules, and what the large judge is shown."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence

from atlas_fast.rewards.rim.clients import CallOutcome
from atlas_fast.rewards.rim.config import ConsistencyConfig
from atlas_fast.rewards.rim.parsing import Judgement

__all__ = ["apply_consistency", "escalation_reason", "lowest_uncertainty", "tier1_summary"]


def escalation_reason(
    outcomes: Sequence[CallOutcome], variance_threshold: float, uncertainty_threshold: float
) -> str | None:
    """Why the tier-1 samples need the large judge, or None when they agree and are sure.

    The spread is the population std of the parsed scores (a single sample has none).
    """
    parsed = [o.judgement for o in outcomes if o.judgement is not None]
    if not parsed:
        return "no tier-1 sample parsed"
    scores = [j.score for j in parsed]
    spread = statistics.pstdev(scores) if len(scores) > 1 else 0.0
    if spread > variance_threshold:
        return f"score std {spread:.3f} > variance_threshold {variance_threshold:g}"
    worst = max(j.uncertainty for j in parsed)
    if worst > uncertainty_threshold:
        return f"uncertainty {worst:.3f} > uncertainty_threshold {uncertainty_threshold:g}"
    return None


def lowest_uncertainty(outcomes: Sequence[CallOutcome]) -> Judgement:
    """The most certain parsed sample; ties go to the earliest (lowest temperature)."""
    parsed = [o.judgement for o in outcomes if o.judgement is not None]
    if not parsed:
        raise ValueError("no parsed tier-1 sample")
    return min(parsed, key=lambda j: j.uncertainty)


def tier1_summary(outcomes: Sequence[CallOutcome], temperatures: Sequence[float]) -> str:
    """The tier-1 samples as JSON for the large judge: principles, score, uncertainty and
    rationale of each, or the failure of a sample that did not parse."""
    rows = []
    for temperature, outcome in zip(temperatures, outcomes, strict=True):
        if outcome.judgement is None:
            rows.append({"temperature": temperature, "failed": outcome.error})
        else:
            rows.append({"temperature": temperature, **outcome.judgement.to_dict()})
    return json.dumps(rows, indent=1, ensure_ascii=False)


def apply_consistency(
    scores: Mapping[str, float], rules: ConsistencyConfig
) -> tuple[dict[str, float], list[str]]:
    """Cap judges that contradict each other; each rule runs only when both its judges are
    present. Returns the adjusted scores (clamped to [0, 1]) and one note per change."""
    out = {judge: min(max(float(s), 0.0), 1.0) for judge, s in scores.items()}
    notes: list[str] = []
    if not rules.enabled:
        return out, notes

    def cap(judge: str, limit: float, why: str) -> None:
        if out[judge] > limit:
            limit = max(limit, 0.0)
            notes.append(f"{judge} {out[judge]:.3f} -> {limit:.3f} ({why})")
            out[judge] = limit

    # Order matters: a process score capped by accuracy then decides the helpfulness cap.
    if "process" in out and "accuracy" in out:
        m = rules.process_over_accuracy
        cap("process", out["accuracy"] + m, f"process <= accuracy + {m:g}")
    if "helpfulness" in out and "process" in out and out["process"] < rules.low_process_threshold:
        cap("helpfulness", rules.low_process_helpfulness_cap,
            f"helpfulness <= {rules.low_process_helpfulness_cap:g} when process < "
            f"{rules.low_process_threshold:g}")
    if "helpfulness" in out and "diagnostic" in out:
        m = rules.helpfulness_over_diagnostic
        cap("helpfulness", out["diagnostic"] + m, f"helpfulness <= diagnostic + {m:g}")
    return out, notes
