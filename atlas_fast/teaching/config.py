"""TeachingConfig: the protocol's templates, token budgets, student sampling and reward weights.

The templates live in YAML (configs/teaching/default.yaml; the demo's in configs/teaching/demo.yaml)
so they can be changed, or overridden key by key from the command line, without touching code.
Only `{name}` placeholders with a known name are substituted, in one pass, and the substituted
text is never read again: a problem or a probe that holds braces (code, LaTeX, JSON) is safe, and
a misspelt placeholder is an error when the config is loaded, not a crash mid-run.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .diagnostic import TIERS
from .reward import TeachingRewardWeights

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

# Which placeholders each template may use.
TEMPLATE_FIELDS: dict[str, tuple[str, ...]] = {
    "baseline": ("problem",),
    "probe": ("problem",),
    "rating": ("problem", "probe"),
    "guidance": ("problem", "probe", "tier", "tier_instruction", "capability"),
    "student_with_guidance": ("problem", "guidance"),
}


@dataclass
class TeachingTemplates:
    """Prompt templates of the two-pass protocol; `tiers` holds the instruction of each tier."""

    baseline: str = "{problem}"
    probe: str = ("Before solving, briefly describe the problem type, the key steps and where you "
                  "might go wrong. Do not solve it yet.\n\nProblem: {problem}")
    rating: str = ("A student described how they would approach a problem.\n\nProblem: {problem}\n\n"
                   "Student's approach: {probe}\n\nRate the approach from 1 (wrong or empty) to 5 "
                   "(correct and complete). Reply with the digit only.")
    guidance: str = ("You are a teacher. A student will solve the problem below after reading your "
                     "guidance. Never state the final answer.\n\nProblem: {problem}\n\n"
                     "Student's approach: {probe}\n\n{tier_instruction}\n\n"
                     "Write your guidance inside <teaching></teaching>.")
    student_with_guidance: str = ("{problem}\n\nA teacher's guidance:\n{guidance}\n\n"
                                  "Give your final answer inside <solution></solution>.")
    tiers: dict[str, str] = field(default_factory=lambda: {
        "low": "The student is struggling: walk them through the solution step by step.",
        "medium": "The student is partly on track: give hints and scaffolding for the hard steps.",
        "high": "The student is nearly there: keep it minimal, or only ask them to verify their work.",
    })

    def validate(self) -> None:
        for name, allowed in TEMPLATE_FIELDS.items():
            text = getattr(self, name)
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"teaching.templates.{name} must be a non-empty string")
            unknown = sorted(set(_PLACEHOLDER.findall(text)) - set(allowed))
            if unknown:
                raise ValueError(f"teaching.templates.{name}: unknown placeholder(s) "
                                 f"{', '.join('{' + u + '}' for u in unknown)}; allowed: {', '.join(allowed)}")
        missing = [t for t in TIERS if not isinstance(self.tiers.get(t), str)]
        extra = sorted(set(self.tiers) - set(TIERS))
        if missing or extra:
            raise ValueError(f"teaching.templates.tiers must hold exactly {', '.join(TIERS)}: "
                             f"missing {missing}, unknown {extra}")

    def render(self, name: str, **values: Any) -> str:
        """Template `name` with its placeholders filled, in one pass."""
        text = getattr(self, name)
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), text)


@dataclass
class TeachingConfig:
    templates: TeachingTemplates = field(default_factory=TeachingTemplates)
    reward: TeachingRewardWeights = field(default_factory=TeachingRewardWeights)
    use_chat_template: bool = True  # wrap each rendered prompt as a user turn when the tokenizer has a template
    probe_max_tokens: int = 50  # the seed's default probe length
    student_max_tokens: int = 256  # the student's baseline and guided answers
    student_temperature: float = 0.0  # greedy: the reward then measures the guidance, not sampling luck
    guidance_tag: str | None = "teaching"  # guidance is the tag's content when present, else the whole reply
    rating_digits: str = "12345"  # the teacher's rating tokens, worst first
    student_weight: float = 0.5  # share of the student's own certainty in capability_level
    student_backend: str | None = None  # rollout backend of the student; None: the trainer's rollout_backend
    student_backend_options: dict = field(default_factory=dict)
    exchanges_per_step: int = 4  # teacher-student exchanges written to output_dir/teaching_exchanges.jsonl

    def __post_init__(self) -> None:
        if isinstance(self.templates, Mapping):
            self.templates = _build(TeachingTemplates, self.templates, "teaching.templates")
        if isinstance(self.reward, Mapping):
            self.reward = _build(TeachingRewardWeights, self.reward, "teaching.reward")
        if isinstance(self.rating_digits, int) and not isinstance(self.rating_digits, bool):
            self.rating_digits = str(self.rating_digits)  # `rating_digits=12345` from a command line reads as a number
        self.validate()

    def validate(self) -> None:
        for name, kind in (("templates", TeachingTemplates), ("reward", TeachingRewardWeights)):
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"teaching.{name} must be a mapping of its settings, got {getattr(self, name)!r}")
        self.templates.validate()
        self.reward.validate()
        for name, kind in (("student_temperature", "a number"), ("student_weight", "a number"),
                           ("rating_digits", "a string"), ("guidance_tag", "a string or null"),
                           ("use_chat_template", "true or false")):
            value = getattr(self, name)
            ok = {"a number": isinstance(value, (int, float)) and not isinstance(value, bool),
                  "a string": isinstance(value, str), "a string or null": value is None or isinstance(value, str),
                  "true or false": isinstance(value, bool)}[kind]
            if not ok:
                raise ValueError(f"teaching.{name} must be {kind}, got {value!r}")
        for name in ("probe_max_tokens", "student_max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"teaching.{name} must be a positive integer, got {value!r}")
        if not self.student_temperature >= 0:
            raise ValueError(f"teaching.student_temperature must be >= 0, got {self.student_temperature}")
        if len(self.rating_digits) != 5 or len(set(self.rating_digits)) != 5:
            raise ValueError(f"teaching.rating_digits must be 5 distinct characters, got {self.rating_digits!r}")
        if not 0.0 <= self.student_weight <= 1.0:
            raise ValueError(f"teaching.student_weight must be in [0, 1], got {self.student_weight}")
        if not isinstance(self.exchanges_per_step, int) or self.exchanges_per_step < 0:
            raise ValueError(f"teaching.exchanges_per_step must be >= 0, got {self.exchanges_per_step!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TeachingConfig":
        return _build(cls, values, "teaching")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_teaching_config(source: str | Path | Mapping | TeachingConfig | None = None) -> TeachingConfig:
    """A TeachingConfig from an instance, a dict, a YAML file, or a name in configs/teaching/."""
    if source is None:
        return TeachingConfig()
    if isinstance(source, TeachingConfig):
        return source
    if isinstance(source, Mapping):
        return TeachingConfig.from_dict(source)
    path = Path(source)
    if not path.suffix:
        path = shipped_configs() / "teaching" / f"{source}.yaml"
    if not path.is_file():
        raise ValueError(f"teaching config {source!r} not found ({path})")
    import yaml

    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, Mapping):
        raise ValueError(f"{path}: a teaching config must be a mapping")
    return TeachingConfig.from_dict(values)


def shipped_configs() -> Path:
    here = Path(__file__).resolve().parent.parent
    checkout = here.parent / "configs"
    return checkout if (checkout / "teaching").is_dir() else here / "configs"


def _build(cls, values: Mapping[str, Any], prefix: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(f'{prefix}.{k}' for k in unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    return cls(**dict(values))
