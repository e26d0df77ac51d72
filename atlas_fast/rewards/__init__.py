"""Reward functions: resolving them from config, calling them, and combining their scores.

The API is TRL's: a reward function is called with keyword arguments
`f(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns)` where `columns`
are the other dataset columns, repeated per generation, and returns one `float | None` per
completion. `None` means "no opinion" (e.g. a math reward on a code sample) and becomes NaN, which
`combine_rewards` and `reward_metrics` skip. `async def` functions run concurrently with each other
on one background event loop.

Also here: `RewardModel` (a sequence-classification model scoring prompt + completion), and the
built-in `accuracy` / `format` rewards with the answer extraction and normalisation they rest on.
Built-ins are pure functions of (prompt, completion, fields); model output is parsed, never run.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import math
import numbers
import re
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atlas_fast.data import is_conversational

__all__ = [
    "BUILTIN_REWARDS",
    "RewardFunc",
    "RewardModel",
    "accuracy_reward",
    "answers_match",
    "combine_rewards",
    "completion_text",
    "compute_rewards",
    "extract_answer",
    "format_reward",
    "make_format_reward",
    "normalize_answer",
    "parse_number",
    "prepare_reward_funcs",
    "resolve_reward_func",
    "reward_func_name",
    "reward_metrics",
]

RewardFunc = Callable[..., "Sequence[float | None] | Awaitable[Sequence[float | None]]"]

# Dataset columns that would collide with the arguments every reward function receives.
_RESERVED_COLUMNS = frozenset(
    {"prompt", "prompts", "completion", "completions", "completion_ids", "trainer_state"}
)


# ----------------------------------------------------------------------------------------------
# Reward model


class RewardModel:
    """A 1-label sequence-classification model used as a reward function.

    The score of a sample is `logits[:, 0]` on the prompt + completion text. Conversations are
    rendered with the reward tokenizer's chat template (prompt messages + completion messages).
    Text is passed with `add_special_tokens=False`, as TRL does, since chat templates already add
    their own BOS. `batch_size` bounds memory (None: the whole batch at once); `max_length`
    truncates from the left so the end of the completion, where the score is pooled, is kept.
    """

    def __init__(
        self,
        model_or_path: Any,
        tokenizer: Any = None,
        *,
        batch_size: int | None = None,
        max_length: int | None = None,
        **from_pretrained_kwargs: Any,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if isinstance(model_or_path, (str, Path)):
            source = str(model_or_path)
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=1, trust_remote_code=False, **from_pretrained_kwargs
            )
        else:
            model = model_or_path
            source = getattr(model.config, "_name_or_path", "") or ""
        if tokenizer is None:
            if not source:
                raise ValueError(
                    "RewardModel needs a tokenizer: the model has no path to load one "
                    "from. Pass tokenizer=..."
                )
            try:
                tokenizer = AutoTokenizer.from_pretrained(source)
            except Exception as err:
                raise ValueError(
                    f"Could not load the reward model's tokenizer from {source!r}; "
                    "pass tokenizer=..."
                ) from err
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(
                    "The reward tokenizer has neither a pad nor an EOS token; set "
                    "tokenizer.pad_token."
                )
            tokenizer.pad_token = tokenizer.eos_token
        # The classification head pools the rightmost non-pad token and refuses batches > 1
        # without a pad id, so the model must agree with the tokenizer on it.
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id

        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.__name__ = Path(source.rstrip("/")).name if source else type(model).__name__

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> RewardModel:
        self.model.to(device)
        return self

    def texts(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[str]:
        texts = []
        for prompt, completion in zip(prompts, completions, strict=True):
            if is_conversational(prompt) or is_conversational(completion):
                if not getattr(self.tokenizer, "chat_template", None):
                    raise ValueError(
                        f"Reward model {self.__name__!r}: conversational samples need "
                        "a tokenizer with a chat template, and this one has none."
                    )
                messages = _as_messages(prompt, "user") + _as_messages(completion, "assistant")
                texts.append(self.tokenizer.apply_chat_template(messages, tokenize=False))
            else:
                texts.append(str(prompt) + str(completion))
        return texts

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Any = None,
        **kwargs: Any,
    ) -> list[float]:
        texts = self.texts(prompts, completions)
        step = self.batch_size or max(len(texts), 1)
        scores: list[float] = []
        for start in range(0, len(texts), step):
            scores.extend(self._score(texts[start : start + step]))
        return scores

    def _score(self, texts: list[str]) -> list[float]:
        truncate = self.max_length is not None
        if truncate:
            self.tokenizer.truncation_side = "left"
        batch = self.tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            padding_side="right",
            truncation=truncate,
            max_length=self.max_length,
            add_special_tokens=False,
        ).to(self.device)
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]  # [b, S]
        # HF pools the rightmost token that is not the *model's* pad id; a tokenizer padding with
        # another id would make it pool a pad position, so padding is rewritten to the model's id.
        input_ids = input_ids.masked_fill(attention_mask == 0, self.model.config.pad_token_id)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # [b, L]
        if logits.ndim != 2:
            raise ValueError(
                f"Reward model {self.__name__!r} returned logits of shape "
                f"{tuple(logits.shape)}; expected [batch, num_labels] from a "
                "sequence-classification model."
            )
        return logits[:, 0].float().cpu().tolist()  # host sync: scores go to Python lists


def _as_messages(x: Any, role: str) -> list[dict[str, Any]]:
    return [dict(m) for m in x] if is_conversational(x) else [{"role": role, "content": str(x)}]


# ----------------------------------------------------------------------------------------------
# Resolution


def reward_func_name(func: Any) -> str:
    """Metric name: `__name__` (functions, RewardModel), else a callable object's class name."""
    while isinstance(func, functools.partial):
        func = func.func
    name = getattr(func, "__name__", None)
    return name if isinstance(name, str) and name else type(func).__name__


def resolve_reward_func(item: Any) -> tuple[str, RewardFunc]:
    """One config entry -> (name, callable).

    Strings resolve in this order: a built-in name (`BUILTIN_REWARDS` key or function name), an
    existing local path (a sequence-classification model), then `"module.path:function"`.
    """
    from transformers import PreTrainedModel

    if isinstance(item, Path):
        item = str(item)
    if isinstance(item, str):
        func = _builtin(item)
        if func is not None:
            return reward_func_name(func), func
        if Path(item).exists():
            model = RewardModel(item)
            return model.__name__, model
        if ":" in item:
            func = _import_function(item)
            return reward_func_name(func), func
        raise ValueError(
            f"Unknown reward {item!r}: not a built-in ({', '.join(sorted(BUILTIN_REWARDS))}), "
            "not an existing model path, and not a 'module.path:function' reference."
        )
    # Models are callable too, so they must be caught before the generic callable case.
    if isinstance(item, PreTrainedModel):
        model = RewardModel(item)
        return model.__name__, model
    if callable(item):
        return reward_func_name(item), item
    raise TypeError(
        f"A reward must be a callable, a string or a PreTrainedModel; got {type(item).__name__}."
    )


def prepare_reward_funcs(
    reward_funcs: Any, reward_model: Any = None
) -> list[tuple[str, RewardFunc]]:
    """Resolve one item or a list of them (plus an optional extra `reward_model`, appended last).

    Duplicate names get `_2`, `_3`, ... suffixes so their `rewards/<name>/...` metrics stay apart.
    """
    items = _as_list(reward_funcs) + _as_list(reward_model)
    if not items:
        raise ValueError(
            "No reward functions given: pass at least one callable, built-in name "
            f"({', '.join(sorted(BUILTIN_REWARDS))}), model path or model."
        )
    resolved = [resolve_reward_func(item) for item in items]
    seen: dict[str, int] = {}
    named = []
    for name, func in resolved:
        seen[name] = seen.get(name, 0) + 1
        named.append((name if seen[name] == 1 else f"{name}_{seen[name]}", func))
    return named


def _as_list(x: Any) -> list[Any]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _builtin(name: str) -> RewardFunc | None:
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    return next((f for f in BUILTIN_REWARDS.values() if reward_func_name(f) == name), None)


def _import_function(ref: str) -> RewardFunc:
    module_name, _, attr_path = ref.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"Malformed reward reference {ref!r}; expected 'module.path:function'.")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"Reward {ref!r}: cannot import module {module_name!r}: {err}") from err
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"Reward {ref!r}: {module_name!r} has no attribute {attr_path!r}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"Reward {ref!r} is a {type(obj).__name__}, not a callable.")
    return obj


# ----------------------------------------------------------------------------------------------
# Calling


def compute_rewards(
    funcs: Sequence[tuple[str, RewardFunc]],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None,
    columns: Mapping[str, Sequence[Any]],
    trainer_state: Any = None,
) -> torch.Tensor:
    """Call every reward function on the batch; returns [B, K] float32, NaN where one returned None.

    Sync functions run one after another; the coroutines of async functions are then awaited
    together. A function whose signature has no `**kwargs` receives only the arguments it names.
    """
    batch = len(prompts)
    columns = {k: v for k, v in columns.items() if k not in _RESERVED_COLUMNS}
    _check_lengths(batch, {"completions": completions, "completion_ids": completion_ids, **columns})
    kwargs = dict(
        prompts=prompts,
        completions=completions,
        completion_ids=completion_ids,
        trainer_state=trainer_state,
        **columns,
    )

    # Checked for every function before any runs: a missing argument is a config error.
    call_kwargs = [_select_kwargs(name, func, kwargs) for name, func in funcs]
    outputs: list[Any] = [None] * len(funcs)
    errors: list[BaseException | None] = [None] * len(funcs)
    pending: dict[int, Awaitable[Any]] = {}
    for k, (_, func) in enumerate(funcs):
        try:
            out = func(**call_kwargs[k])
        except Exception as err:
            errors[k] = err
            continue
        if inspect.isawaitable(out):
            pending[k] = out
        else:
            outputs[k] = out
    if any(e is not None for e in errors):
        # Don't pay for (possibly remote) async judges when the batch is already lost.
        for awaitable in pending.values():
            if inspect.iscoroutine(awaitable):
                awaitable.close()
        pending = {}
    if pending:
        results = _run_async(_gather(list(pending.values())))
        for k, result in zip(pending, results, strict=True):
            if isinstance(result, Exception):
                errors[k] = result
            elif isinstance(result, BaseException):
                raise result
            else:
                outputs[k] = result

    for (name, func), err in zip(funcs, errors, strict=True):
        if err is not None:
            raise _explain_failure(name, func, kwargs, batch, err)
    rewards = torch.full((batch, len(funcs)), math.nan, dtype=torch.float32)  # [B, K]
    for k, (name, _) in enumerate(funcs):
        rewards[:, k] = torch.tensor(_to_floats(name, outputs[k], batch), dtype=torch.float32)
    return rewards


def _check_lengths(batch: int, seqs: Mapping[str, Sequence[Any] | None]) -> None:
    for key, seq in seqs.items():
        if seq is not None and len(seq) != batch:
            raise ValueError(
                f"'{key}' has {len(seq)} entries but there are {batch} prompts; every "
                "column must be repeated once per completion."
            )


def _select_kwargs(name: str, func: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # some builtins and C callables have no signature
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return kwargs
    names = {p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL}
    missing = [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty
        and p.name not in kwargs
        and p.kind is not inspect.Parameter.VAR_POSITIONAL
    ]
    if missing:
        raise ValueError(
            f"Reward function '{name}' requires argument(s) {', '.join(missing)}, which "
            f"are not available; it can receive: {', '.join(kwargs)}."
        )
    return {k: v for k, v in kwargs.items() if k in names}


async def _gather(awaitables: list[Awaitable[Any]]) -> list[Any]:
    return await asyncio.gather(*awaitables, return_exceptions=True)


class _LoopThread:
    """One event loop on a daemon thread, started on first use.

    A persistent loop (rather than `asyncio.run` per batch) lets async reward functions keep
    clients (HTTP sessions, API SDKs) that are bound to the loop they were first used on, and
    works even when the caller already runs inside an event loop (notebooks).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(
                    target=loop.run_forever, name="reward-event-loop", daemon=True
                ).start()
                self._loop = loop
            return self._loop


_LOOP_THREAD = _LoopThread()


def _run_async(coro: Any) -> Any:
    return asyncio.run_coroutine_threadsafe(coro, _LOOP_THREAD.loop()).result()


def _explain_failure(
    name: str, func: Any, kwargs: dict[str, Any], batch: int, err: BaseException
) -> Exception:
    """Re-run a failed function one sample at a time to name the first sample that breaks it.

    Costs up to B extra calls, only on the error path.
    """
    for i in range(batch):
        single = {
            k: (v[i : i + 1] if k != "trainer_state" and _sliceable(v) else v)
            for k, v in kwargs.items()
        }
        call_kwargs = _select_kwargs(name, func, single)
        try:
            out = func(**call_kwargs)
            if inspect.isawaitable(out):
                _run_async(_await(out))
        except Exception as sample_err:
            failure = RuntimeError(
                f"Reward function '{name}' raised {type(err).__name__}: {err}. First failing "
                f"sample: index {i} ({type(sample_err).__name__}: {sample_err}); completion: "
                f"{_preview(kwargs['completions'][i])}"
            )
            failure.__cause__ = err
            return failure
    failure = RuntimeError(
        f"Reward function '{name}' raised {type(err).__name__}: {err} on the batch "
        f"of {batch}, but no single sample reproduces it."
    )
    failure.__cause__ = err
    return failure


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _sliceable(v: Any) -> bool:
    return (
        not isinstance(v, (str, bytes, Mapping))
        and hasattr(v, "__getitem__")
        and hasattr(v, "__len__")
    )


def _preview(x: Any, limit: int = 200) -> str:
    text = completion_text(x) if isinstance(x, (str, list, tuple)) else str(x)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _to_floats(name: str, out: Any, batch: int) -> list[float]:
    if isinstance(out, (torch.Tensor, np.ndarray)):
        if out.ndim != 1:
            raise ValueError(
                f"Reward function '{name}' returned an array of shape {tuple(out.shape)}; "
                f"expected {batch} values."
            )
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise ValueError(
            f"Reward function '{name}' returned {type(out).__name__}; expected a list of "
            f"{batch} rewards (float or None)."
        )
    if len(out) != batch:
        raise ValueError(
            f"Reward function '{name}' returned {len(out)} rewards, expected {batch} "
            "(one per completion)."
        )
    values = []
    for i, v in enumerate(out):
        if v is None:
            values.append(math.nan)
            continue
        if isinstance(v, np.generic) or (isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim == 0):
            v = v.item()
        if not isinstance(v, numbers.Real):
            raise ValueError(
                f"Reward function '{name}' returned a non-number at index {i}: {v!r} "
                f"({type(v).__name__}); expected float or None."
            )
        v = float(v)
        if math.isinf(v):
            # An infinite reward turns every advantage of its group into NaN.
            raise ValueError(
                f"Reward function '{name}' returned {v} at index {i}; rewards must be "
                "finite (return None for 'no reward')."
            )
        values.append(v)
    return values


# ----------------------------------------------------------------------------------------------
# Combining and logging


def combine_rewards(per_func: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """[B, K] -> [B]: sum_k w_k * r_k over the functions that scored the sample; NaN if none did."""
    num_funcs = per_func.shape[1]
    if weights is None:
        w = torch.ones(num_funcs, dtype=per_func.dtype, device=per_func.device)
    else:
        if len(weights) != num_funcs:
            raise ValueError(
                f"reward_weights has {len(weights)} entries but there are {num_funcs} "
                "reward functions."
            )
        w = torch.as_tensor(list(weights), dtype=per_func.dtype, device=per_func.device)
        if not torch.isfinite(w).all():
            raise ValueError(f"reward_weights must be finite, got {list(weights)}.")
    total = torch.nansum(per_func * w, dim=1)  # [B]
    return total.masked_fill(torch.isnan(per_func).all(dim=1), math.nan)


def reward_metrics(per_func: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    """`rewards/<name>/mean` and `rewards/<name>/std` (Bessel-corrected), ignoring NaN.

    A function with no scores has a NaN mean; with fewer than two scores, a NaN std.
    """
    if len(names) != per_func.shape[1]:
        raise ValueError(f"{len(names)} names for {per_func.shape[1]} reward columns.")
    x = per_func.detach().float().cpu()  # [B, K]
    present = ~torch.isnan(x)
    count = present.sum(dim=0)  # [K]
    mean = torch.nanmean(x, dim=0)  # [K]
    sq_dev = torch.where(present, (x - mean) ** 2, torch.zeros_like(x))
    std = (sq_dev.sum(dim=0) / (count - 1).clamp(min=1)).sqrt()
    std = torch.where(count >= 2, std, torch.full_like(std, math.nan))
    metrics = {}
    for name, m, s in zip(names, mean.tolist(), std.tolist(), strict=True):
        metrics[f"rewards/{name}/mean"] = m
        metrics[f"rewards/{name}/std"] = s
    return metrics


# ----------------------------------------------------------------------------------------------
# Answer extraction and comparison


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
    ends = [m.start() for m in (_SENTENCE_END.search(answer), _CLAUSE.search(answer)) if m]
    if ends:
        answer = answer[: min(ends)]
    return answer.strip().strip("*").strip() or None


_UNWRAP_COMMANDS = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|boxed|fbox)\s*\{")
_DROP = re.compile(r"\\[!,;: ]|\\left|\\right|\\displaystyle|\^\s*\{?\\circ\}?|\*\*")
_NUMERIC = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_FRAC = re.compile(r"(?P<sign>[-+]?)\\[dt]?frac\{(?P<num>[^{}]+)\}\{(?P<den>[^{}]+)\}")


def normalize_answer(answer: Any) -> str:
    """Canonical text of an answer: numbers as exact integers or rounded to 2 decimals (half up),
    other text lower-cased with whitespace collapsed; `$`, `\\text{}`-style wrappers, LaTeX spacing
    and a trailing period removed."""
    text = _strip_wrappers(str(answer))
    number = parse_number(text)
    if number is not None:
        return _format_number(number)
    return re.sub(r"\s+", " ", text).strip().rstrip(".").strip().lower()


def answers_match(pred: Any, truth: Any) -> bool:
    """True when `pred` equals `truth` (or any of a list of truths) after normalisation."""
    if pred is None:
        return False
    truths = [t for t in (truth if isinstance(truth, (list, tuple)) else [truth]) if t is not None]
    pred_norm = normalize_answer(pred)
    if not pred_norm:
        return False
    if any(normalize_answer(t) == pred_norm for t in truths):
        return True
    # "3.5 cm" against a numeric truth "3.5": units are dropped, but only when the truth is a
    # bare number, so a truth of "2 pi" still needs the "pi".
    with_unit = _NUMBER_WITH_UNIT.fullmatch(_strip_wrappers(str(pred)))
    if with_unit is None:
        return False
    value = parse_number(with_unit["num"])
    return any(parse_number(_strip_wrappers(str(t))) == value for t in truths)


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
        text = _DROP.sub("", text).replace("$", "")
        text = text.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
        text = text.strip().rstrip(".").strip()
        if text == before:
            break
    return text


# ----------------------------------------------------------------------------------------------
# Built-in rewards


def _truth_answer(truth: Any) -> Any:
    """The answer inside a ground truth: GSM8K solutions end in '#### X', MATH solutions box it."""
    if isinstance(truth, (list, tuple)):
        return [_truth_answer(t) for t in truth]
    if not isinstance(truth, str):
        return truth
    if "####" in truth:
        return truth.rsplit("####", 1)[1].strip()
    boxed = _last_boxed(truth)
    return boxed if boxed is not None else truth


def accuracy_reward(
    prompts: Sequence[Any], completions: Sequence[Any], ground_truth: Sequence[Any], **kwargs: Any
) -> list[float | None]:
    """1.0 when the completion's extracted answer matches `ground_truth`, else 0.0; None (no
    reward) for a sample without a ground truth."""
    rewards: list[float | None] = []
    for completion, truth in zip(completions, ground_truth, strict=True):
        if truth is None or (isinstance(truth, str) and not truth.strip()):
            rewards.append(None)
            continue
        pred = extract_answer(completion_text(completion))
        rewards.append(1.0 if answers_match(pred, _truth_answer(truth)) else 0.0)
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

BUILTIN_REWARDS: dict[str, RewardFunc] = {"accuracy": accuracy_reward, "format": format_reward}
