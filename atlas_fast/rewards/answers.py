"""Final-answer extraction from completions and normalised answer comparison.

Model output is parsed, never run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from atlas_fast.data import is_conversational

__all__ = ["answers_match", "completion_text", "extract_answer", "has_truth", "normalize_answer", "parse_number"]


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the last assistant message of a conversation."""
    if isinstance(completion, str):
        return completion
    if is_conversational(completion):
        messages = [m for m in completion if m["role"] == "assistant"] or list(completion)
        return _content_text(messages[-1]["content"])
    return str(completion)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):  # multimodal parts: [{"type": "text", "text": ...}]
        return "".join(p.get("text", "") if isinstance(p, Mapping) else str(p) for p in content)
    return "" if content is None else str(content)


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_SOLUTION = re.compile(r"<solution>(.*?)</solution>", re.IGNORECASE | re.DOTALL)
_ANSWER_PHRASE = re.compile(
    r"(?:\b(?:final\s+)?answer\s*(?:is\b\s*:?|:|=)|####)\s*(?P<ans>[^\n]+)", re.IGNORECASE
)
_NUMBER = re.compile(
    r"(?:(?<![\w)\]])[-\u2212+])?(?<![\d.,])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
)
_SENTENCE_END = re.compile(r"[.;!?](?:\s|$)")
_CLAUSE = re.compile(r",\s+(?=[A-Za-z])")  # "12, since ..." ends the answer; "(1, 2)" does not
_NUMBER_WITH_UNIT = re.compile(
    r"\$?(?P<num>[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)\s*(?:[A-Za-z\u00b0]+\.?\s*){1,3}"
)


def extract_answer(text: str) -> str | None:
    """The final answer in a completion, by precedence: the last balanced `\\boxed{...}`; the last
    `<solution>...</solution>`; the last answer phrase ("the answer is X", "answer: X",
    "final answer: X", GSM8K's "#### X"); the last number. None when there is none."""
    if not isinstance(text, str):
        text = completion_text(text)
    for find in (_last_boxed, _last_solution, _last_answer_phrase):
        candidate = find(text)
        if candidate:
            return candidate
    numbers_found = _NUMBER.findall(text)
    return numbers_found[-1].replace("\u2212", "-") if numbers_found else None


def _braced(text: str, open_index: int) -> str | None:
    """Content of the brace group opening at `open_index`, or None when it never closes."""
    depth = 0
    for i in range(open_index, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : i]
    return None


def has_truth(truth: Any) -> bool:
    """Whether a row has a ground truth to grade against (rows without one get no reward and count
    in no accuracy)."""
    return truth is not None and not (isinstance(truth, str) and not truth.strip())


def truth_answer(truth: Any) -> Any:
    """The answer inside a ground truth: GSM8K solutions end in '#### X', MATH solutions box it;
    anything else is the answer itself. Lists map element by element."""
    if isinstance(truth, (list, tuple)):
        return [truth_answer(t) for t in truth]
    if not isinstance(truth, str):
        return truth
    if "####" in truth:
        return truth.rsplit("####", 1)[1].strip()
    boxed = _last_boxed(truth)
    return boxed if boxed is not None else truth


def _last_boxed(text: str) -> str | None:
    # Scan from the end: a truncated final \boxed{ must not hide an earlier complete one.
    for match in reversed(list(_BOXED.finditer(text))):
        content = _braced(text, match.end() - 1)
        if content is not None and content.strip():
            return content.strip()
    return None


def _last_solution(text: str) -> str | None:
    matches = [m.group(1).strip() for m in _SOLUTION.finditer(text)]
    return next((m for m in reversed(matches) if m), None)


def _last_answer_phrase(text: str) -> str | None:
    matches = list(_ANSWER_PHRASE.finditer(text))
    if not matches:
        return None
    answer = matches[-1].group("ans").replace("**", "")  # markdown bold
    # "Final Answer: The final answer is $42$.": a phrase inside the captured rest of the line
    for _ in range(4):
        inner = list(_ANSWER_PHRASE.finditer(answer))
        if not inner:
            break
        answer = inner[-1].group("ans")
    ends = [m.start() for m in (_SENTENCE_END.search(answer), _CLAUSE.search(answer)) if m]
    if ends:
        answer = answer[: min(ends)]
    return answer.strip().strip("*").strip() or None


_UNWRAP_COMMANDS = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|boxed|fbox)\s*\{")
_DROP = re.compile(r"\\[!,;: ]|\\left|\\right|\\displaystyle|\^\s*\{?\\circ\}?|\*\*")
_NUMERIC = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_FRAC = re.compile(r"(?P<sign>[-+]?)\\[dt]?frac\{(?P<num>[^{}]+)\}\{(?P<den>[^{}]+)\}")


def normalize_answer(answer: Any) -> str:
    """Canonical text of an answer (for display and text search; answers_match compares numbers by
    value): numbers as exact integers or rounded to 2 decimals (half up),
    other text lower-cased with whitespace collapsed; `$`, `\\text{}`-style wrappers, LaTeX spacing
    and a trailing period removed."""
    text = _strip_wrappers(str(answer))
    number = parse_number(text)
    if number is not None:
        return _format_number(number)
    return re.sub(r"\s+", " ", text).strip().rstrip(".").strip().lower()


def answers_match(pred: Any, truth: Any) -> bool:
    """True when `pred` equals `truth` (or any of a list of truths): numbers by value (a decimal
    written with 2 or more places also matches the values it rounds: "0.33" and 1/3 either way,
    but not 2.001 and 2), other text after normalisation."""
    if pred is None:
        return False
    truths = [t for t in (truth if isinstance(truth, (list, tuple)) else [truth]) if t is not None]
    pred_norm = normalize_answer(pred)
    if not pred_norm:
        return False
    pred_text = _strip_wrappers(str(pred))
    pred_value = parse_number(pred_text)
    texts = [_strip_wrappers(str(t)) for t in truths]
    values = [parse_number(text) for text in texts]
    for t, text, value in zip(truths, texts, values):
        if pred_value is not None and value is not None:
            if _same_number(pred_value, pred_text, value, text):
                return True
        elif normalize_answer(t) == pred_norm:
            return True
    # "3.5 cm" against a numeric truth "3.5": units are dropped, but only when the truth is a
    # bare number, so a truth of "2 pi" still needs the "pi".
    with_unit = _NUMBER_WITH_UNIT.fullmatch(pred_text)
    if with_unit is None:
        return False
    number = parse_number(with_unit["num"])
    return number is not None and any(v is not None and _same_number(number, with_unit["num"], v, text)
                                      for text, v in zip(texts, values))


def _same_number(a: Fraction, a_text: str, b: Fraction, b_text: str) -> bool:
    """Equal, or one is the other rounded to the 2 or more decimal places it is written with."""
    if a == b:
        return True
    # The rounded one is the side written with fewer places, 2 at least ("3.14" of "3.14159",
    # "0.33" of "1/3"); a side without decimals is exact ("2" is not "2.001" rounded).
    sides = sorted((p, value, other) for p, value, other in ((_decimal_places(a_text), a, b), (_decimal_places(b_text), b, a))
                   if p >= 2)
    if not sides:
        return False
    places, rounded, exact = sides[0]
    return abs(rounded - exact) <= Fraction(1, 2 * 10**places)


def _decimal_places(text: str) -> int:
    match = re.fullmatch(r"[^.]*\.(\d+)%?", text.strip())
    return len(match.group(1)) if match else 0


def parse_number(text: str) -> Fraction | None:
    """Exact value of a plain number ("1,000", "+5", "-0.25", "1e3"), a fraction ("3/4",
    "\\frac{3}{4}") or a percentage ("50%" -> 50); None for anything else."""
    text = text.strip().replace("\u2212", "-").replace("\\%", "%")
    if text.endswith("%"):
        text = text[:-1].strip()
    if _NUMERIC.fullmatch(text):
        return Fraction(text.replace(",", "").rstrip("."))
    frac = _FRAC.fullmatch(text)
    if frac:
        num, den = parse_number(frac["num"]), parse_number(frac["den"])
        if num is None or not den:
            return None
        return -num / den if frac["sign"] == "-" else num / den
    if text.count("/") == 1:
        num_text, den_text = text.split("/")
        if _NUMERIC.fullmatch(num_text.strip()) and _NUMERIC.fullmatch(den_text.strip()):
            num, den = parse_number(num_text), parse_number(den_text)
            return num / den if num is not None and den else None
    return None


def _format_number(x: Fraction) -> str:
    if x.denominator == 1:
        return str(x.numerator)
    hundredths = math.floor(abs(x) * 100 + Fraction(1, 2))  # round half up, exactly
    sign = "-" if x < 0 and hundredths else ""
    whole, cents = divmod(hundredths, 100)
    return f"{sign}{whole}" if cents == 0 else f"{sign}{whole}.{cents:02d}".rstrip("0")


def _strip_wrappers(text: str) -> str:
    text = text.strip()
    for _ in range(8):  # wrappers nest (e.g. $\boxed{\text{...}}$); a few passes reach a fixpoint
        before = text
        match = _UNWRAP_COMMANDS.search(text)
        if match:
            content = _braced(text, match.end() - 1)
            if content is not None:
                text = text[: match.start()] + content + text[match.end() + len(content) + 1 :]
        text = _DROP.sub("", text).replace("\\$", "").replace("$", "").replace("{,}", ",")
        text = text.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
        text = text.strip().rstrip(".").strip()
        if text == before:
            break
    return text
