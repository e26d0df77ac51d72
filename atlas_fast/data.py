"""Prompt datasets: loading, ATLAS field aliases, the train/eval split, prompt rendering and the
resumable prompt sampler that feeds the GRPO loop.

A record needs a `prompt` (a string, or a conversation: a list of `{"role", "content"}` messages);
every other column (`ground_truth`, ids, metadata) travels with it to the reward functions.
ATLAS data names the same fields `problem` / `question` and `answer` / `solution`; those are
renamed on load so the rest of the package sees one schema.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa

__all__ = [
    "FIELD_ALIASES",
    "PromptSampler",
    "epoch_permutation",
    "is_conversational",
    "load_dataset_any",
    "render_prompt",
    "train_eval_split",
]

# target column -> aliases, in order of preference (the first present alias wins).
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "prompt": ("problem", "question"),
    "ground_truth": ("answer", "solution"),
}

AnyDataset = datasets.Dataset | datasets.IterableDataset


# ----------------------------------------------------------------------------------------------
# Loading


def load_dataset_any(source: Any) -> AnyDataset:
    """Return a `datasets.Dataset` / `IterableDataset` with a `prompt` column.

    `source` may be a `Dataset`, an `IterableDataset`, a list of dicts, or a path (str or Path) to a
    `.jsonl` / `.json` file. Alias columns are renamed (see `FIELD_ALIASES`) only when the target
    name is absent, so a dataset that has both `prompt` and `question` keeps both untouched.
    """
    if isinstance(source, (str, Path)):
        dataset: AnyDataset = _from_records(_read_json_records(Path(source)))
    elif isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        dataset = source
    elif isinstance(source, Sequence) and all(isinstance(row, Mapping) for row in source):
        if len(source) == 0:
            raise ValueError("The dataset is empty: got an empty list of records.")
        dataset = _from_records([dict(row) for row in source])
    else:
        raise TypeError(
            "Expected a datasets.Dataset, a datasets.IterableDataset, a list of dicts or a path "
            f"to a .jsonl/.json file; got {type(source).__name__}."
        )

    columns = _column_names(dataset)  # raises on an empty dataset
    for old, new in _alias_renames(columns).items():
        dataset = dataset.rename_column(old, new)
        columns = [new if c == old else c for c in columns]
    if "prompt" not in columns:
        raise ValueError(
            "The dataset has no 'prompt' column (nor an alias: "
            f"{', '.join(FIELD_ALIASES['prompt'])}). Columns found: {', '.join(columns) or 'none'}."
        )
    return dataset


def _from_records(records: list[dict]) -> datasets.Dataset:
    # from_list takes its columns from the first record: a key that first shows up later (a
    # ground_truth missing from row 0) would vanish. Every record gets every key, None if absent.
    keys = list(dict.fromkeys(k for r in records for k in r))
    if any(len(r) != len(keys) for r in records):
        records = [{k: r.get(k) for k in keys} for r in records]
    try:
        return datasets.Dataset.from_list(records)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        # Hand-written JSONL often mixes `"ground_truth": 42` and `"ground_truth": "x + 1"`; Arrow
        # needs one type per column, and answers are compared as normalised text anyway.
        mixed = _mixed_scalar_columns(records)
        if not mixed:
            raise ValueError(f"Could not build a dataset from the records: {err}") from err
        fixed = [
            {k: (str(v) if k in mixed and _is_scalar(v) else v) for k, v in r.items()}
            for r in records
        ]
        try:
            return datasets.Dataset.from_list(fixed)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err2:
            raise ValueError(f"Could not build a dataset from the records: {err2}") from err


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool))


def _mixed_scalar_columns(records: list[dict]) -> set[str]:
    """Columns whose values mix strings with other scalars (None aside)."""
    kinds: dict[str, set[bool]] = {}
    for record in records:
        for key, value in record.items():
            if _is_scalar(value):
                kinds.setdefault(key, set()).add(isinstance(value, str))
    return {key for key, k in kinds.items() if len(k) == 2}


def _alias_renames(columns: Sequence[str]) -> dict[str, str]:
    renames = {}
    for target, aliases in FIELD_ALIASES.items():
        if target in columns:
            continue
        present = [a for a in aliases if a in columns]
        if present:
            renames[present[0]] = target
    return renames


def _column_names(dataset: AnyDataset) -> list[str]:
    if isinstance(dataset, datasets.IterableDataset):
        # Features of a generator-backed IterableDataset are often unknown until a row is read;
        # one peeked row both gives the columns and proves the dataset is not empty.
        first = next(iter(dataset), None)
        if first is None:
            raise ValueError("The dataset is empty: the IterableDataset yielded no rows.")
        return list(dataset.column_names or first.keys())
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: it has no rows.")
    return list(dataset.column_names)


def _read_json_records(path: Path) -> list[dict]:
    # Parsed here rather than with datasets' json builder: no cache directory is written, and a
    # malformed line is reported with its line number.
    if not path.exists():
        raise ValueError(f"Dataset file not found: {path}")
    if not path.is_file():
        raise ValueError(f"Dataset path is not a file: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json"):
        raise ValueError(
            f"Unsupported dataset file type {suffix or '(none)'!r} for {path}; "
            "expected .jsonl or .json."
        )
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        records = _parse_jsonl(text, path)
    else:
        try:
            records = _records_from_json(json.loads(text), path)
        except json.JSONDecodeError:
            # Many ".json" files in the wild are really JSON Lines.
            records = _parse_jsonl(text, path)
    if not records:
        raise ValueError(f"The dataset is empty: {path} holds no records.")
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ValueError(
            f"{path}: record {bad} is a {type(records[bad]).__name__}, expected an object."
        )
    return records


def _parse_jsonl(text: str, path: Path) -> list[Any]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg}).") from err
    return records


def _records_from_json(obj: Any, path: Path) -> list[Any]:
    if isinstance(obj, list):
        return obj
    # {"data": [...]} style wrappers: accept a single list-of-records value.
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
    raise ValueError(f"{path}: expected a JSON list of records (or an object holding one list).")


# ----------------------------------------------------------------------------------------------
# Split


def train_eval_split(
    dataset: datasets.Dataset, eval_fraction: float = 0.1, seed: int = 42
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """ATLAS's split: a seeded shuffle, `eval_fraction` of the rows (rounded up) for evaluation.

    `eval_fraction=0` returns `(dataset, None)` so callers can switch evaluation off.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}.")
    if isinstance(dataset, datasets.IterableDataset):
        raise ValueError(
            "train_eval_split needs a map-style datasets.Dataset; an IterableDataset "
            "has no known length. Pass a separate eval dataset instead."
        )
    if eval_fraction == 0.0:
        return dataset, None
    if len(dataset) < 2:
        raise ValueError(f"Cannot split a dataset of {len(dataset)} row(s) into train and eval.")
    split = dataset.train_test_split(test_size=eval_fraction, seed=seed)
    return split["train"], split["test"]


# ----------------------------------------------------------------------------------------------
# Prompts


def is_conversational(prompt: Any) -> bool:
    """True for a non-empty list of `{"role", "content"}` messages."""
    return (
        isinstance(prompt, (list, tuple))
        and len(prompt) > 0
        and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in prompt)
    )


def render_prompt(prompt: Any, tokenizer: Any = None, **chat_template_kwargs: Any) -> str:
    """The text the policy is conditioned on.

    Strings pass through. Conversations go through the tokenizer's chat template with a generation
    prompt; when the last message is from the assistant it is continued instead (a prefilled
    answer), since opening a new assistant turn after it would discard the prefill's intent.
    Extra keyword arguments reach the template (e.g. `enable_thinking=False` for Qwen3).
    """
    if isinstance(prompt, str):
        return prompt
    if not is_conversational(prompt):
        raise TypeError(
            "A prompt must be a string or a list of {'role', 'content'} messages; got "
            f"{type(prompt).__name__}: {str(prompt)[:100]!r}."
        )
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        name = type(tokenizer).__name__ if tokenizer is not None else "None"
        raise ValueError(
            f"Conversational prompts need a tokenizer with a chat template, but the tokenizer "
            f"({name}) has none. Set `tokenizer.chat_template` or use string prompts."
        )
    messages = [dict(m) for m in prompt]
    prefill = messages[-1]["role"] == "assistant"
    return tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=not prefill,
        continue_final_message=prefill,
        **chat_template_kwargs,
    )


# ----------------------------------------------------------------------------------------------
# Sampler


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch: a pure function of (seed, epoch), so a resumed run can rebuild
    it. SeedSequence mixes the pair, so (seed=1, epoch=0) and (seed=0, epoch=1) do not collide."""
    rng = np.random.default_rng([seed % 2**64, epoch])
    return rng.permutation(num_rows).tolist()


class PromptSampler:
    """Yields, forever, batches of `prompts_per_batch` rows (dicts of every dataset column).

    Map-style datasets are reshuffled each epoch (`epoch_permutation`) when `shuffle=True`, or read
    in order. An `IterableDataset` is read in its own order; `set_epoch(epoch)` is called on it so a
    shuffle-buffered stream varies per epoch, deterministically.

    Epoch boundaries: a batch that reaches the end of an epoch is filled from the start of the
    next one, so every batch is full (GRPO groups and micro-batch shapes stay fixed, and no rows
    are dropped). After each batch, `epochs_begun` / `epochs_ended` list the epochs whose first /
    last row it contains, for the trainer's on_epoch_begin / on_epoch_end hooks; the optional
    `on_epoch_begin(epoch)` / `on_epoch_end(epoch)` callbacks fire as those rows are drawn.

    Rows are not repeated here: the trainer expands each prompt into its G generations.

    Resume: `state_dict()` holds (epoch, position) - the epoch of the next row and how many rows of
    it were consumed. A fresh sampler over the same dataset and seed, after `load_state_dict`,
    yields exactly the rows an uninterrupted run would have.
    """

    def __init__(
        self,
        dataset: AnyDataset | Sequence[Mapping[str, Any]],
        prompts_per_batch: int,
        *,
        shuffle: bool = True,
        seed: int = 42,
        on_epoch_begin: Callable[[int], None] | None = None,
        on_epoch_end: Callable[[int], None] | None = None,
    ) -> None:
        if prompts_per_batch < 1:
            raise ValueError(f"prompts_per_batch must be >= 1, got {prompts_per_batch}.")
        self.dataset = dataset
        self.prompts_per_batch = prompts_per_batch
        self.shuffle = shuffle
        self.seed = seed
        self.on_epoch_begin = on_epoch_begin
        self.on_epoch_end = on_epoch_end
        self.is_iterable = isinstance(dataset, datasets.IterableDataset) or not hasattr(
            dataset, "__len__"
        )
        self.num_rows: int | None = None if self.is_iterable else len(dataset)
        if self.num_rows == 0:
            raise ValueError("PromptSampler got an empty dataset.")

        self.epoch = 0  # epoch of the next row to draw
        self.position = 0  # rows of `epoch` already drawn
        self.epochs_begun: tuple[int, ...] = ()
        self.epochs_ended: tuple[int, ...] = ()
        self._order: list[int] | None = None  # map-style row order for self.epoch
        # Iterable datasets: the open stream, positioned after `position` rows, and its next row.
        self._stream: Iterator[Mapping[str, Any]] | None = None
        self._lookahead: Mapping[str, Any] | None = None

    # -- public API ---------------------------------------------------------------------------

    def __iter__(self) -> PromptSampler:
        return self

    def __next__(self) -> list[dict[str, Any]]:
        return self.next_batch()

    def next_batch(self) -> list[dict[str, Any]]:
        begun: list[int] = []
        ended: list[int] = []
        if self.is_iterable:
            rows = self._draw_iterable(begun, ended)
        else:
            rows = self._fetch(self._draw_indices(begun, ended))
        self.epochs_begun, self.epochs_ended = tuple(begun), tuple(ended)
        return rows

    def upcoming_epochs(self) -> tuple[int, ...]:
        """The epochs whose first row the next batch will hold, known before drawing it (so a
        trainer can announce an epoch before the step that generates from it). An iterable
        dataset's end is only found by reading it: there only an epoch starting at the next row
        is foreseen."""
        if self.num_rows is None:
            return (self.epoch,) if self.position == 0 else ()
        begun, epoch, position, need = [], self.epoch, self.position, self.prompts_per_batch
        while need > 0:
            if position == 0:
                begun.append(epoch)
            take = min(need, self.num_rows - position)
            need, position = need - take, position + take
            if position == self.num_rows:
                epoch, position = epoch + 1, 0
        return tuple(begun)

    def num_batches(self, epochs: float) -> int:
        """Batches needed to cover `epochs` passes over a map-style dataset."""
        if self.num_rows is None:
            raise ValueError(
                "The length of an IterableDataset is unknown; set a step count instead."
            )
        # Rounded first: 0.07 * 100 is 7.000000000000001 in floating point, which ceil makes 8.
        return math.ceil(round(epochs * self.num_rows / self.prompts_per_batch, 9))

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_rows": self.num_rows,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # The seed orders nothing but a shuffled, sized dataset: elsewhere a new seed sees the same rows.
        keys = ("seed", "shuffle", "num_rows") if self.shuffle and self.num_rows is not None else ("shuffle", "num_rows")
        for key in keys:
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"Cannot resume the prompt sampler: saved {key}={state[key]!r} but this "
                    f"sampler has {key}={getattr(self, key)!r}; the resumed run would not see "
                    "the same rows."
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or position < 0 or (self.num_rows is not None and position >= self.num_rows):
            raise ValueError(f"Invalid sampler state: epoch={epoch}, position={position}.")
        self.epoch, self.position = epoch, position
        self._order = None
        self._stream = None
        self._lookahead = None
        self.epochs_begun = self.epochs_ended = ()

    # -- map-style ----------------------------------------------------------------------------

    def _draw_indices(self, begun: list[int], ended: list[int]) -> list[int]:
        assert self.num_rows is not None
        indices: list[int] = []
        while len(indices) < self.prompts_per_batch:
            if self.position == 0:
                self._begin_epoch(begun)
            take = min(self.prompts_per_batch - len(indices), self.num_rows - self.position)
            indices.extend(self._epoch_order()[self.position : self.position + take])
            self.position += take
            if self.position == self.num_rows:
                self._end_epoch(ended)
        return indices

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            assert self.num_rows is not None
            self._order = (
                epoch_permutation(self.num_rows, self.seed, self.epoch)
                if self.shuffle
                else list(range(self.num_rows))
            )
        return self._order

    def _fetch(self, indices: list[int]) -> list[dict[str, Any]]:
        if isinstance(self.dataset, datasets.Dataset):
            # One columnar read instead of a Python-level lookup per row.
            columns = self.dataset[indices]
            return [{k: v[i] for k, v in columns.items()} for i in range(len(indices))]
        return [dict(self.dataset[i]) for i in indices]

    # -- iterable -----------------------------------------------------------------------------

    def _draw_iterable(self, begun: list[int], ended: list[int]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        while len(rows) < self.prompts_per_batch:
            if self._stream is None:
                self._open_stream()
            if self.position == 0:
                self._begin_epoch(begun)
            assert self._lookahead is not None
            rows.append(dict(self._lookahead))
            self.position += 1
            # One row of lookahead tells us the epoch ended with this row, not a call later, so
            # the epoch events fire on the same batch as for a map-style dataset.
            self._lookahead = next(self._stream, None)
            if self._lookahead is None:
                self._stream = None
                self._end_epoch(ended)
        return rows

    def _open_stream(self) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        stream = iter(self.dataset)
        # Skipping consumed rows is O(position), but exact for any deterministic stream.
        skipped = sum(1 for _ in itertools.islice(stream, self.position))
        if skipped < self.position:
            raise ValueError(
                f"Cannot resume: epoch {self.epoch} of the dataset has {skipped} rows, but the "
                f"saved state had consumed {self.position}."
            )
        self._lookahead = next(stream, None)
        if self._lookahead is None:
            raise ValueError(
                "PromptSampler got an empty dataset."
                if self.position == 0
                else f"Cannot resume: epoch {self.epoch} has exactly {self.position} rows, "
                "so the saved position is past its end."
            )
        self._stream = stream

    # -- epoch bookkeeping --------------------------------------------------------------------

    def _begin_epoch(self, begun: list[int]) -> None:
        begun.append(self.epoch)
        if self.on_epoch_begin is not None:
            self.on_epoch_begin(self.epoch)

    def _end_epoch(self, ended: list[int]) -> None:
        ended.append(self.epoch)
        if self.on_epoch_end is not None:
            self.on_epoch_end(self.epoch)
        self.epoch += 1
        self.position = 0
        self._order = None
