"""RIM's configuration: typed dataclasses, loaded from a dict, an OmegaConf node or a YAML path.

Every threshold, margin, temperature and limit the judges use is a field here; nothing downstream
has a number of its own. Loading goes through an OmegaConf structured schema, so an unknown key or
a wrong type is an error that names the key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atlas_fast.rewards.rim.templates import PromptTemplate

__all__ = [
    "BACKENDS",
    "ConsistencyConfig",
    "ESCALATION_FIELDS",
    "JUDGES",
    "JudgeModelConfig",
    "PROMPT_FIELDS",
    "RIMConfig",
    "load_rim_config",
]

JUDGES = ("accuracy", "helpfulness", "process", "diagnostic")
BACKENDS = ("openai", "hf", "litellm")
# What a judge prompt may mention. `response` is the completion being scored; the others come
# from dataset columns (see RIMConfig.fields) or from the config (constitution_principles).
PROMPT_FIELDS = (
    "question",
    "response",
    "ground_truth",
    "student_answer",
    "student_baseline_answer",
    "student_plan",
    "teacher_trace",
    "student_trace",
    "constitution_principles",
)
# The large judge's prompt may also show the tier-1 samples it arbitrates.
ESCALATION_FIELDS = (*PROMPT_FIELDS, "judge", "tier1_evaluations", "judge_prompt")


@dataclass
class JudgeModelConfig:
    """One judge model and how to reach it."""

    backend: str = "openai"  # openai: any /v1/chat/completions server; hf: in-process; litellm
    model: str = ""  # the served model name, a local HF folder (hf), or a LiteLLM model id
    base_url: str | None = None  # e.g. http://127.0.0.1:8000/v1 (openai); api_base (litellm)
    api_key_env: str | None = None  # the *name* of the environment variable holding the key
    max_tokens: int = 512
    json_mode: bool = False  # send response_format={"type": "json_object"} (servers that know it)
    device: str = "cpu"  # hf only
    dtype: str = "auto"  # hf only: auto, float32, bfloat16, float16


@dataclass
class ConsistencyConfig:
    """Cross-judge rules, applied only when both judges of a rule are active."""

    enabled: bool = True
    process_over_accuracy: float = 0.1  # process <= accuracy + margin
    low_process_threshold: float = 0.5  # when process < threshold ...
    low_process_helpfulness_cap: float = 0.5  # ... helpfulness <= cap
    helpfulness_over_diagnostic: float = 0.1  # helpfulness <= diagnostic + margin


@dataclass
class RIMConfig:
    judges: list[str] = field(default_factory=lambda: list(JUDGES))
    small_model: JudgeModelConfig = field(default_factory=JudgeModelConfig)
    large_model: JudgeModelConfig = field(default_factory=JudgeModelConfig)
    temperatures: list[float] = field(default_factory=lambda: [0.2, 0.5, 0.8])  # tier-1 samples
    large_temperature: float = 0.3
    variance_threshold: float = 0.15  # escalate when the tier-1 scores' std exceeds this
    uncertainty_threshold: float = 0.3  # escalate when any tier-1 uncertainty exceeds this
    max_parallel: int = 8  # judge calls in flight at once (hf backend: the generate batch size)
    timeout_s: float = 60.0  # per call, connect to last byte
    max_retries: int = 2  # re-sends after a timeout, a connection error, HTTP 429 or 5xx
    backoff_s: float = 0.5  # first retry delay; doubles each retry
    parse_retries: int = 1  # re-asks after a reply that is not a valid judgement
    cache_size: int = 4096  # judgements kept for identical calls (model, prompt, temperature)
    max_field_chars: int = 8000  # longer inputs are cut (middle elided) before they reach a prompt
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    constitution_principles: str = ""
    # Prompt field -> the dataset columns that may fill it, first present wins. `prompt` and
    # `completion` name the prompt and the completion being scored.
    fields: dict[str, list[str]] = field(
        default_factory=lambda: {
            "question": ["question", "problem", "prompt"],
            "response": ["completion"],
            "ground_truth": ["ground_truth", "answer", "solution"],
            "student_answer": ["student_answer", "guided_answer", "completion"],
            "student_baseline_answer": ["student_baseline_answer", "baseline_answer", "baseline"],
            "student_plan": ["student_plan", "probe", "diagnostic_probe"],
            "teacher_trace": ["teacher_trace", "guidance", "teaching"],
            "student_trace": ["student_trace"],
        }
    )
    # system, escalation and one template per judge; missing entries come from the shipped
    # configs/reward_system/prompts/default.yaml.
    prompts: dict[str, str] = field(default_factory=dict)
    weight: float = 1.0  # this reward's weight when the CLI appends it to the reward functions
    log_explanations: bool = True  # rows for output_dir/rim_explanations.jsonl

    def validate(self) -> None:
        _check(bool(self.judges), "judges", "must name at least one judge")
        for judge in self.judges:
            _check(judge in JUDGES, "judges", f"unknown judge {judge!r}; known: {', '.join(JUDGES)}")
        _check(len(set(self.judges)) == len(self.judges), "judges", "lists a judge twice")
        for key in ("small_model", "large_model"):
            model = getattr(self, key)
            _check(model.backend in BACKENDS, f"{key}.backend",
                   f"{model.backend!r} is not one of {', '.join(BACKENDS)}")
            _check(bool(model.model), f"{key}.model", "must name a model")
            _check(model.max_tokens >= 1, f"{key}.max_tokens", "must be >= 1")
            if model.backend == "openai":
                _check(bool(model.base_url), f"{key}.base_url",
                       "is required for the openai backend (e.g. http://127.0.0.1:8000/v1)")
        _check(bool(self.temperatures), "temperatures", "needs at least one tier-1 temperature")
        for t in (*self.temperatures, self.large_temperature):
            _check(math.isfinite(t) and t >= 0, "temperatures", f"{t} is not a temperature >= 0")
        for key in ("variance_threshold", "uncertainty_threshold"):
            _check(getattr(self, key) >= 0, key, "must be >= 0")
        _check(self.max_parallel >= 1, "max_parallel", "must be >= 1")
        _check(self.timeout_s > 0, "timeout_s", "must be > 0")
        for key in ("max_retries", "parse_retries", "cache_size"):
            _check(getattr(self, key) >= 0, key, "must be >= 0")
        _check(self.backoff_s >= 0, "backoff_s", "must be >= 0")
        _check(self.max_field_chars >= 64, "max_field_chars", "must be >= 64")
        for f in self.fields:
            _check(f in PROMPT_FIELDS, f"fields.{f}",
                   f"is not a prompt field; known: {', '.join(PROMPT_FIELDS)}")
        for key, text in self.prompts.items():
            _check(key in ("system", "escalation", *JUDGES), f"prompts.{key}",
                   "is not a prompt name; known: system, escalation, " + ", ".join(JUDGES))
        for key in ("system", "escalation", *self.judges):
            _check(isinstance(self.prompts.get(key), str) and bool(self.prompts[key].strip()),
                   f"prompts.{key}", "is missing or empty")

    def templates(self) -> dict[str, PromptTemplate]:
        """Compiled templates; a misspelt placeholder fails here, at load time."""
        out = {
            judge: PromptTemplate(self.prompts[judge], PROMPT_FIELDS, name=f"prompts.{judge}")
            for judge in self.judges
        }
        out["escalation"] = PromptTemplate(
            self.prompts["escalation"], ESCALATION_FIELDS, name="prompts.escalation"
        )
        return out


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ValueError(f"reward_system.{key}: {problem}")


def load_rim_config(source: Any) -> RIMConfig:
    """A RIMConfig from a RIMConfig, a dict, an OmegaConf node, or a path to a YAML file."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(source, RIMConfig):
        config = dataclasses.replace(source)
    else:
        if isinstance(source, (str, Path)):
            raw = _load_yaml(Path(source))
        elif isinstance(source, DictConfig):
            raw = OmegaConf.to_container(source, resolve=True)
        elif isinstance(source, dict):
            raw = source
        else:
            raise TypeError(
                "RIMReward config must be a dict, an OmegaConf node or a YAML path; got "
                f"{type(source).__name__}."
            )
        raw = {k: v for k, v in dict(raw).items() if k != "defaults"}
        for key in ("small_model", "large_model"):  # OmegaConf's merge error would name no key
            if key in raw and raw[key] is not None and not isinstance(raw[key], (dict, DictConfig)):
                raise ValueError(f"reward_system.{key} must be a mapping (backend, model, ...), got {raw[key]!r}")
        try:
            merged = OmegaConf.merge(OmegaConf.structured(RIMConfig), raw)
            config = OmegaConf.to_object(merged)
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or ""
            raise ValueError(f"reward_system.{key}: {err.msg if hasattr(err, 'msg') else err}") from None
    config.prompts = {**default_prompts(), **dict(config.prompts)}
    config.validate()
    return config


def _load_yaml(path: Path) -> dict[str, Any]:
    """A reward_system YAML with its `defaults` list resolved as Hydra does for the two forms
    used here: `- name` merges the sibling `name.yaml`; `- group: name` merges
    `group/name.yaml` under the key `group`. The file's own keys win (`_self_` last)."""
    from omegaconf import OmegaConf

    if not path.is_file():
        raise ValueError(f"reward_system config {path} does not exist.")
    node = OmegaConf.load(path)
    raw = OmegaConf.to_container(node, resolve=False)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level.")
    layers: list[Any] = []
    for entry in raw.pop("defaults", None) or []:
        if entry == "_self_":
            continue
        if isinstance(entry, str):
            layers.append(_load_yaml(path.parent / f"{entry}.yaml"))
        elif isinstance(entry, dict) and len(entry) == 1:
            ((group, name),) = entry.items()
            group = str(group).removeprefix("optional ").strip()
            if name is not None:
                layers.append({group: _load_yaml(path.parent / group / f"{name}.yaml")})
        else:
            raise ValueError(f"{path}: unsupported defaults entry {entry!r}.")
    merged = OmegaConf.merge(*layers, raw) if layers else OmegaConf.create(raw)
    return OmegaConf.to_container(merged, resolve=False)


def default_prompts() -> dict[str, str]:
    """The shipped judge prompts (configs/reward_system/prompts/default.yaml)."""
    from omegaconf import OmegaConf

    for path in _prompt_file_candidates():
        if path.is_file():
            prompts = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            return {str(k): str(v) for k, v in prompts.items()}
    raise ValueError(
        "The shipped judge prompts (reward_system/prompts/default.yaml) are missing; give "
        "every prompt under reward_system.prompts."
    )


def _prompt_file_candidates() -> list[Path]:
    rel = Path("reward_system") / "prompts" / "default.yaml"
    package = Path(__file__).resolve().parents[2]  # atlas_fast/
    # The checkout's configs/ (editable install), then the copy shipped inside the package.
    return [package.parent / "configs" / rel, package / "configs" / rel]
