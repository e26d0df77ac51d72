"""Judge output -> a validated `Judgement`, repairing malformed JSON where that is safe.

Safe repairs only change syntax, never content: take the first balanced `{...}` object out of
surrounding prose or a code fence, turn single-quoted strings into JSON strings, drop trailing
commas, and read Python's `True` / `False` / `None` as JSON's literals. Nothing is evaluated.
Anything still unparsable, or a parsed object that breaks the schema (a score outside [0, 1], no
principles, ...), raises `JudgementError`; the caller retries and finally counts a failed sample.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any

__all__ = ["Judgement", "JudgementError", "Principle", "parse_judgement", "repair_json"]

# Weights are renormalised to sum to 1; a sum further than this from 1 is still accepted (judges
# round: 0.33 + 0.33 + 0.33) but recorded as renormalised.
_WEIGHT_SUM_TOLERANCE = 0.02
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


class JudgementError(ValueError):
    """A judge's reply that is not a valid judgement (after the safe repairs)."""


@dataclass(frozen=True)
class Principle:
    name: str
    weight: float
    description: str = ""


@dataclass(frozen=True)
class Judgement:
    """One judge sample: principles (weights sum to 1), a score and an uncertainty in [0, 1]."""

    score: float
    uncertainty: float
    rationale: str
    principles: tuple[Principle, ...]
    repaired: bool = False  # the raw reply needed a syntax repair
    renormalised: bool = False  # the principle weights did not sum to 1 and were rescaled

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "uncertainty": self.uncertainty,
            "rationale": self.rationale,
            "principles": [
                {"name": p.name, "weight": p.weight, "description": p.description}
                for p in self.principles
            ],
        }


def parse_judgement(text: str) -> Judgement:
    """Parse and validate one judge reply: the whole reply as one JSON object, else the last
    object in it that is a valid judgement (a reasoning judge's drafts, or the format example a
    judge echoes, come before its verdict)."""
    first_error: JudgementError | None = None
    last: Judgement | None = None
    for obj, repaired in _json_values(text):
        try:
            judgement = _judgement(obj, repaired)
        except JudgementError as err:
            first_error = first_error or err
            continue
        if not repaired:  # the whole reply
            return judgement
        last = judgement
    if last is not None:
        return last
    raise first_error or JudgementError(f"no parsable JSON object in the reply ({_preview(text)})")


def repair_json(text: str) -> tuple[Any, bool]:
    """The first JSON value in `text` and whether a repair was needed; raises JudgementError."""
    for value in _json_values(text):
        return value
    raise JudgementError(f"no parsable JSON object in the reply ({_preview(text)})")


def _judgement(obj: Any, repaired: bool) -> Judgement:
    if not isinstance(obj, dict):
        raise JudgementError(f"expected a JSON object, got {type(obj).__name__}")
    score = _unit_number(obj, "score")
    uncertainty = _unit_number(obj, "uncertainty")
    rationale = obj.get("rationale", obj.get("explanation", ""))
    if not isinstance(rationale, str):
        rationale = json.dumps(rationale)
    principles, renormalised = _principles(obj.get("principles"))
    return Judgement(score=score, uncertainty=uncertainty, rationale=rationale.strip(),
                     principles=principles, repaired=repaired, renormalised=renormalised)


def _json_values(text: str) -> Iterator[tuple[Any, bool]]:
    """JSON values found in `text`, each with whether it needed a repair: the whole text, then
    code-fenced blocks, then balanced {...} groups, each as written and then syntax-normalised."""
    if not isinstance(text, str) or not text.strip():
        return
    try:
        yield json.loads(text, strict=False), False  # strict=False: raw newlines inside strings
    except ValueError:
        pass
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + list(_objects(text))
    for candidate in candidates:
        for attempt in (candidate, _normalise_syntax(candidate)):
            try:
                value = json.loads(attempt, strict=False)
            except ValueError:
                continue
            yield value, True
            break


# Judges wrap their object in prose that may hold braces of its own ("a score in {0, 1}", LaTeX's
# \frac{a}{b}); the balanced groups are tried in order of their opening brace, outermost first, up
# to this many of those with a key in them (a ':'), which a JSON object needs.
_MAX_OBJECT_CANDIDATES = 16


def _objects(text: str) -> Iterator[str]:
    """Balanced {...} groups of `text` (braces inside quoted strings skipped), nested ones too."""
    start, found = text.find("{"), 0
    while start != -1 and found < _MAX_OBJECT_CANDIDATES:
        group = _balanced_from(text, start)
        if group is not None and ":" in group:
            found += 1
            yield group
        start = text.find("{", start + 1)


def _balanced_from(text: str, start: int) -> str | None:
    """The balanced group opening at `text[start] == '{'`, or None when it never closes."""
    depth, quote, escaped, prev = 0, None, False, ""
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            # An apostrophe in prose ("student's") is not a quote: only one that opens a key or
            # a value (after { [ , or :) starts a string.
            if ch == '"' or prev in ("{", "[", ",", ":"):
                quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
        if not ch.isspace():
            prev = ch
    return None


_BARE_WORDS = {"True": "true", "False": "false", "None": "null"}


def _normalise_syntax(text: str) -> str:
    """Single-quoted strings -> JSON strings, trailing commas dropped, Python literals -> JSON.

    One left-to-right scan that tracks strings, so commas, quotes and words inside string
    contents are never touched.
    """
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "\"'":
            j, buf = i + 1, []
            while j < n and text[j] != ch:
                if text[j] == "\\" and j + 1 < n:
                    nxt = text[j + 1]
                    # \' is valid only in the single-quoted source; JSON wants a plain '
                    buf.append("'" if nxt == "'" else "\\" + nxt)
                    j += 2
                    continue
                buf.append('\\"' if text[j] == '"' else text[j])
                j += 1
            out.append('"' + "".join(buf) + '"')
            i = j + 1
        elif ch == ",":
            k = i + 1
            while k < n and text[k].isspace():
                k += 1
            if k < n and text[k] in "}]":
                i += 1  # trailing comma
            else:
                out.append(ch)
                i += 1
        elif ch.isalpha():
            j = i
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            word = text[i:j]
            out.append(_BARE_WORDS.get(word, word))
            i = j
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _unit_number(obj: dict[str, Any], key: str) -> float:
    if key not in obj:
        raise JudgementError(f"missing '{key}'")
    value = obj[key]
    if isinstance(value, str):
        try:
            value = float(value.strip().rstrip("%"))
        except ValueError:
            raise JudgementError(f"'{key}' is not a number: {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise JudgementError(f"'{key}' is not a finite number: {value!r}")
    if not 0.0 <= value <= 1.0:
        raise JudgementError(f"'{key}' = {value} is outside [0, 1]")
    return float(value)


def _principles(raw: Any) -> tuple[tuple[Principle, ...], bool]:
    if not isinstance(raw, list) or not raw:
        raise JudgementError("'principles' must be a non-empty list")
    names, weights, descriptions = [], [], []
    for k, item in enumerate(raw):
        if not isinstance(item, dict):
            raise JudgementError(f"principle {k} is not an object")
        name = item.get("name")
        weight = item.get("weight")
        if not isinstance(name, str) or not name.strip():
            raise JudgementError(f"principle {k} has no name")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise JudgementError(f"principle {name!r} has no numeric weight")
        if not math.isfinite(weight) or weight < 0:
            raise JudgementError(f"principle {name!r} has weight {weight}")
        names.append(name.strip())
        weights.append(float(weight))
        descriptions.append(str(item.get("description", "")).strip())
    total = sum(weights)
    if total <= 0:
        raise JudgementError("principle weights sum to 0")
    renormalised = abs(total - 1.0) > _WEIGHT_SUM_TOLERANCE
    principles = tuple(
        Principle(n, w / total, d) for n, w, d in zip(names, weights, descriptions, strict=True)
    )
    return principles, renormalised


def _preview(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
