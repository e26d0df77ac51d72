"""`RIMReward`: a panel of LLM judges as a reward function for any trainer.

Per sample and active judge: tier 1 samples the small judge once per configured temperature; the
large judge is asked instead when the tier-1 scores spread more than `variance_threshold`, any
uncertainty exceeds `uncertainty_threshold`, or no sample parsed, and it is shown the tier-1
principles, scores and rationales. A judge whose large judge fails too scores 0, and the info
says so. Otherwise the most certain tier-1 sample stands. Consistency rules then cap judges that
contradict each other, and the reward is the mean over active judges.

All judge calls of a batch go out together, bounded by `max_parallel`: first every tier-1 call,
then every escalation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from atlas_fast.data import is_conversational
from atlas_fast.modeling import missing_local_source
from atlas_fast.rewards.answers import completion_text
from atlas_fast.rewards.rim.clients import CallOutcome, JudgeCaller, JudgeClient, JudgeRequest, build_client
from atlas_fast.rewards.rim.config import PROMPT_FIELDS, JudgeModelConfig, RIMConfig, load_rim_config
from atlas_fast.rewards.rim.judging import (
    apply_consistency,
    escalation_reason,
    lowest_uncertainty,
    tier1_summary,
)

__all__ = ["RIMReward"]

_NOT_PROVIDED = "(not provided)"


class RIMReward:
    """`RIMReward(config)(prompts, completions, completion_ids=None, **columns) -> rewards`.

    `config`: a dict, an OmegaConf node, a YAML path (e.g. configs/reward_system/interpretation.yaml)
    or a `RIMConfig`. `small_client` / `large_client` replace the backends the config names (any
    object with `complete(request, timeout) -> str`).

    After each call `last_info` holds one dict per sample (per-judge scores, principles,
    rationales, tier-1 samples, escalation and failures), `last_metrics` the batch's
    `rim_rewards/<judge>` means and escalation rates, and `last_table` the rows a trainer appends
    to `output_dir/rim_explanations.jsonl`. `return_info=True` returns `(rewards, infos)`.
    """

    def __init__(self, config: Any, *, small_client: JudgeClient | None = None,
                 large_client: JudgeClient | None = None) -> None:
        self.config: RIMConfig = load_rim_config(config)
        self.templates = self.config.templates()
        self.__name__ = "rim"
        c = self.config
        small = small_client or _client(c, "small_model")
        if large_client is None:
            # One backend object when both tiers name the same endpoint or local model, so a local
            # model is loaded once.
            same = _endpoint(c.small_model) == _endpoint(c.large_model)
            large_client = small if same and small_client is None else _client(c, "large_model")
        limits = dict(max_parallel=c.max_parallel, timeout_s=c.timeout_s, max_retries=c.max_retries,
                      backoff_s=c.backoff_s, parse_retries=c.parse_retries, cache_size=c.cache_size)
        self.small = JudgeCaller(small, **limits)
        self.large = self.small if large_client is small else JudgeCaller(large_client, **limits)
        self.last_info: list[dict[str, Any]] = []
        self.last_metrics: dict[str, float] = {}
        self.last_table: tuple[str, list[dict[str, Any]]] | None = None

    def __repr__(self) -> str:
        c = self.config
        return (f"RIMReward(judges={c.judges}, small={c.small_model.backend}:{c.small_model.model}, "
                f"large={c.large_model.backend}:{c.large_model.model})")

    def close(self) -> None:
        self.small.close()
        self.large.close()

    # ------------------------------------------------------------------------------------------
    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any],
                 completion_ids: Any = None, *, return_info: bool = False,
                 **columns: Any) -> list[float] | tuple[list[float], list[dict[str, Any]]]:
        c = self.config
        columns.pop("trainer_state", None)
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"RIMReward got {len(prompts)} prompts for {n} completions.")
        for key, values in columns.items():
            if values is not None and len(values) != n:
                raise ValueError(f"RIMReward: column '{key}' has {len(values)} entries for {n} completions.")
        fields = [self._fields(i, prompts, completions, columns) for i in range(n)]
        sent_before = self._sent()
        judge_prompts = {(i, j): self.templates[j].render(fields[i]) for i in range(n) for j in c.judges}

        # Tier 1: every (sample, judge, temperature) at once.
        keys = [(i, j) for i in range(n) for j in c.judges]
        tier1_requests = [
            self._request(c.small_model, judge_prompts[key], t) for key in keys for t in c.temperatures
        ]
        flat = self.small.run(tier1_requests)
        k = len(c.temperatures)
        tier1 = {key: flat[m * k : (m + 1) * k] for m, key in enumerate(keys)}
        reasons = {key: escalation_reason(tier1[key], c.variance_threshold, c.uncertainty_threshold)
                   for key in keys}

        # Tier 2: the escalations, shown the tier-1 samples.
        escalated = [key for key in keys if reasons[key] is not None]
        tier2_requests = [
            self._request(c.large_model, self.templates["escalation"].render({
                **fields[key[0]],
                "judge": key[1],
                "judge_prompt": judge_prompts[key],
                "tier1_evaluations": tier1_summary(tier1[key], c.temperatures),
            }), c.large_temperature)
            for key in escalated
        ]
        tier2 = dict(zip(escalated, self.large.run(tier2_requests), strict=True))

        infos = [self._sample_info(i, tier1, reasons, tier2) for i in range(n)]
        for i, info in enumerate(infos):
            info["prompt"] = fields[i]["question"]
            info["completion"] = fields[i]["response"]
        rewards = [info["reward"] for info in infos]
        self.last_info = infos
        self.last_metrics = self._metrics(infos, sent_before)
        self.last_table = ("rim_explanations", [_table_row(i, info) for i, info in enumerate(infos)]) \
            if c.log_explanations else None
        return (rewards, infos) if return_info else rewards

    # ------------------------------------------------------------------------------------------
    def _sample_info(self, i: int, tier1: Mapping[tuple[int, str], list[CallOutcome]],
                     reasons: Mapping[tuple[int, str], str | None],
                     tier2: Mapping[tuple[int, str], CallOutcome]) -> dict[str, Any]:
        c = self.config
        raw: dict[str, float] = {}
        info: dict[str, Any] = {
            "reward": 0.0, "rewards": {}, "raw_rewards": raw, "explanations": {}, "principles": {},
            "uncertainty": {}, "escalated": False, "escalation_reasons": {}, "failed": {},
            "consistency": [], "tier": {}, "samples": {}, "large_sample": {},
        }
        for judge in c.judges:
            key = (i, judge)
            info["samples"][judge] = [_sample_dict(t, o) for t, o in zip(c.temperatures, tier1[key], strict=True)]
            reason = reasons[key]
            if reason is None:
                chosen, tier = lowest_uncertainty(tier1[key]), 1
            else:
                info["escalation_reasons"][judge] = reason
                outcome = tier2[key]
                info["large_sample"][judge] = _sample_dict(c.large_temperature, outcome)
                chosen, tier = outcome.judgement, 2
                if chosen is None:
                    info["failed"][judge] = f"large judge failed after escalation ({reason}): {outcome.error}"
            info["tier"][judge] = tier
            if chosen is None:
                raw[judge] = 0.0
                info["explanations"][judge] = info["failed"][judge]
                info["principles"][judge] = []
                info["uncertainty"][judge] = None
            else:
                raw[judge] = chosen.score
                info["explanations"][judge] = chosen.rationale
                info["principles"][judge] = chosen.to_dict()["principles"]
                info["uncertainty"][judge] = chosen.uncertainty
        final, notes = apply_consistency(raw, c.consistency)
        info.update(
            reward=sum(final.values()) / len(final),
            rewards=final,
            consistency=notes,
            escalated=bool(info["escalation_reasons"]),
        )
        return info

    def _fields(self, i: int, prompts: Sequence[Any], completions: Sequence[Any],
                columns: Mapping[str, Sequence[Any]]) -> dict[str, str]:
        limit = self.config.max_field_chars
        sources: dict[str, Any] = {"prompt": _prompt_text(prompts[i]),
                                   "completion": completion_text(completions[i])}
        values = {}
        for name in PROMPT_FIELDS:
            if name == "constitution_principles":
                values[name] = self.config.constitution_principles.strip() or _NOT_PROVIDED
                continue
            text = None
            for column in self.config.fields.get(name, []):
                value = sources[column] if column in sources else (
                    columns[column][i] if columns.get(column) is not None else None)
                text = _as_text(value)
                if text:
                    break
            values[name] = _clip(text, limit) if text else _NOT_PROVIDED
        return values

    def _request(self, model: JudgeModelConfig, user_prompt: str, temperature: float) -> JudgeRequest:
        return JudgeRequest(
            model=model.model,
            messages=(("system", self.config.prompts["system"]), ("user", user_prompt)),
            temperature=float(temperature),
            max_tokens=model.max_tokens,
        )

    def _sent(self) -> dict[str, int]:
        callers = {id(self.small): self.small, id(self.large): self.large}.values()
        return {k: sum(c.stats[k] for c in callers) for k in ("requests", "cache_hits")}

    def _metrics(self, infos: list[dict[str, Any]], sent_before: Mapping[str, int]) -> dict[str, float]:
        judges = self.config.judges
        n = max(len(infos), 1)
        metrics = {f"rim_rewards/{j}": sum(info["rewards"][j] for info in infos) / n for j in judges}
        pairs = max(len(infos) * len(judges), 1)
        metrics["rim/escalation_rate"] = sum(len(info["escalation_reasons"]) for info in infos) / pairs
        metrics["rim/failure_rate"] = sum(len(info["failed"]) for info in infos) / pairs
        samples = [s for info in infos for j in judges for s in info["samples"][j]]
        metrics["rim/tier1_parse_rate"] = (
            sum("score" in s for s in samples) / len(samples) if samples else float("nan"))
        sent = self._sent()
        metrics["rim/requests"] = float(sent["requests"] - sent_before["requests"])
        metrics["rim/cache_hits"] = float(sent["cache_hits"] - sent_before["cache_hits"])
        return metrics


def _client(config: RIMConfig, key: str) -> JudgeClient:
    model = getattr(config, key)
    if model.backend == "hf" and model.model and missing_local_source(model.model):
        raise ValueError(f"reward_system.{key}.model: {model.model} does not exist (a local folder, or a hub id like org/name)")
    try:
        return build_client(getattr(config, key), batch_size=config.max_parallel)
    except (ValueError, OSError) as err:  # OSError: a local model folder that is not there
        raise ValueError(f"reward_system.{key}: {err}") from err


def _endpoint(m: JudgeModelConfig) -> tuple[Any, ...]:
    return (m.backend, m.base_url, m.api_key_env, m.device, m.dtype, m.json_mode) + (
        (m.model,) if m.backend == "hf" else ())


def _sample_dict(temperature: float, outcome: CallOutcome) -> dict[str, Any]:
    if outcome.judgement is None:
        return {"temperature": temperature, "error": outcome.error, "attempts": outcome.attempts}
    return {"temperature": temperature, **outcome.judgement.to_dict(), "cached": outcome.cached,
            "repaired": outcome.judgement.repaired}


def _table_row(i: int, info: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "index": i,
        "prompt": info["prompt"],
        "completion": info["completion"],
        "reward": info["reward"],
        "rewards": info["rewards"],
        "explanations": info["explanations"],
        "escalation_reasons": info["escalation_reasons"],
        "failed": info["failed"],
        "consistency": info["consistency"],
    }


def _prompt_text(prompt: Any) -> str:
    """The question: a string prompt, or the conversation's messages as 'role: content' lines."""
    if is_conversational(prompt):
        return "\n".join(f"{m['role']}: {completion_text([m])}" for m in prompt)
    return str(prompt)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if is_conversational(value):
        return completion_text(value).strip()
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return " | ".join(v.strip() for v in value)  # several accepted answers
    return json.dumps(value, ensure_ascii=False, default=str)


def _clip(text: str, limit: int) -> str:
    """Keep the head and the tail: the question's setup and the answer's end both matter."""
    if len(text) <= limit:
        return text
    half = (limit - 40) // 2
    return f"{text[:half]}\n...[{len(text) - 2 * half} characters cut]...\n{text[-half:]}"
