"""Running reward functions: resolving them from config, calling them (sync and async), combining
their scores with weights, and their metrics.

A function returns one `float | None` per completion; `None` ("no opinion") becomes NaN, which
`combine_rewards` and `reward_metrics` skip. `async def` functions run concurrently with each other
on one background event loop.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import json
import math
import numbers
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atlas_fast.rewards.answers import completion_text
from atlas_fast.rewards.builtin import BUILTIN_REWARDS
from atlas_fast.rewards.reward_model import RewardModel

__all__ = [
    "RewardFunc",
    "append_reward_tables",
    "combine_rewards",
    "compute_rewards",
    "prepare_reward_funcs",
    "resolve_reward_func",
    "reward_func_name",
    "reward_metrics",
    "reward_reports",
]

RewardFunc = Callable[..., "Sequence[float | None] | Awaitable[Sequence[float | None]]"]

# Dataset columns that would collide with the arguments every reward function receives.
_RESERVED_COLUMNS = frozenset(
    {"prompt", "prompts", "completion", "completions", "completion_ids", "trainer_state"}
)


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


def reward_reports(
    funcs: Sequence[tuple[str, RewardFunc]],
) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
    """What reward functions expose about their last call, for the trainer to log: step metrics
    (`last_metrics`, e.g. RIM's `rim_rewards/<judge>`) and per-sample tables
    (`last_table = (name, rows)`, e.g. RIM's judge rationales as `rim_explanations`)."""
    metrics: dict[str, float] = {}
    tables: dict[str, list[dict[str, Any]]] = {}
    for _, func in funcs:
        metrics.update(getattr(func, "last_metrics", None) or {})
        table = getattr(func, "last_table", None)
        if table:
            name, rows = table
            tables.setdefault(name, []).extend(rows)
    return metrics, tables


def append_reward_tables(
    output_dir: str | Path, step: int, tables: Mapping[str, Sequence[Mapping[str, Any]]]
) -> None:
    """Append each table's rows, stamped with the step, to `output_dir/<name>.jsonl`."""
    from atlas_fast.metrics import to_jsonable

    for name, rows in tables.items():
        if not rows:
            continue
        path = Path(output_dir) / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(to_jsonable({"step": int(step), **row}), ensure_ascii=False) for row in rows]
        with open(path, "a", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))
