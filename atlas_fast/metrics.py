"""Training metrics: JSONL log (always), optional TensorBoard / W&B mirrors, plots.

The JSONL file is the source of truth: it needs no extra dependency, survives
crashes line by line, and is what :func:`plot_metrics` reads. TensorBoard and
W&B are best-effort mirrors; a missing backend produces a warning, never an
exception, because losing a dashboard must not cost a training run.

Non-finite floats (NaN, +/-inf) are written as JSON ``null`` so that every line
is strict JSON that any parser (``jq``, pandas, browsers) accepts.
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "plot_metrics", "format_metrics", "read_metrics", "build_metrics_figure"]

DEFAULT_PLOT_KEYS: tuple[str, ...] = ("reward", "kl", "completions/mean_length")
_KNOWN_BACKENDS = frozenset({"jsonl", "tensorboard", "wandb"})


# --------------------------------------------------------------------------- conversion


def to_jsonable(value: Any) -> Any:
    """Convert tensors / numpy values (recursively) into plain JSON-safe Python values."""
    # Tensors and numpy arrays both expose `.tolist()`, which also turns 0-d values into
    # Python scalars; duck typing avoids importing torch or numpy just to convert.
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    return str(value)


def _scalar_or_none(value: Any) -> float | None:
    """A finite float, or None for anything that is not a single finite number."""
    value = to_jsonable(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


# --------------------------------------------------------------------------- logger


class MetricsLogger:
    """Appends metrics to ``output_dir/metrics.jsonl`` and mirrors them to optional backends.

    On non-main processes every method is a no-op, so a distributed trainer can
    call it unconditionally instead of guarding each call with ``if rank == 0``.
    """

    def __init__(
        self,
        output_dir: str | Path,
        report_to: str | Sequence[str] = ("jsonl",),
        run_name: str | None = None,
        is_main_process: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.run_name = run_name
        self.enabled = is_main_process
        # Only the main process warns, so a misconfiguration is reported once, not per rank.
        self.backends = _normalize_backends(report_to, warn=is_main_process)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self._jsonl = None
        self._tensorboard = None
        self._wandb_run = None
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # Append so that a resumed run extends the history rather than erasing it. A run that died
        # mid-write left a partial last line: end it, so the next record starts a line of its own.
        partial = False
        if self.metrics_path.is_file() and self.metrics_path.stat().st_size:
            with open(self.metrics_path, "rb") as existing:
                existing.seek(-1, 2)
                partial = existing.read(1) != b"\n"
        self._jsonl = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 - lives until close()
        if partial:
            self._jsonl.write("\n")
        if "tensorboard" in self.backends:
            self._tensorboard = _open_tensorboard(self.output_dir, run_name)
        if "wandb" in self.backends:
            self._wandb_run = _open_wandb(self.output_dir, run_name)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record one set of metrics for ``step`` on every enabled backend."""
        if not self.enabled or self._jsonl is None:
            return
        record = {"step": int(step), **{str(k): to_jsonable(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        # Flush per line: after a crash the log must reach the last completed step.
        self._jsonl.flush()
        if self._tensorboard is not None:
            self._log_tensorboard(record, int(step))
        if self._wandb_run is not None:
            self._log_wandb(record, int(step))

    def log_completions(self, step: int, rows: Iterable[Mapping[str, Any]]) -> Path | None:
        """Write sampled completions (prompt, completion, rewards, advantage, ...) for ``step``."""
        if not self.enabled:
            return None
        directory = self.output_dir / "completions"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"step-{int(step)}.jsonl"
        lines = [json.dumps(to_jsonable(dict(row)), ensure_ascii=False, allow_nan=False) for row in rows]
        # Overwrite rather than append: re-running a step after resume replaces its samples.
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    def close(self) -> None:
        """Flush and release every backend; safe to call more than once."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _log_tensorboard(self, record: Mapping[str, Any], step: int) -> None:
        for key, value in record.items():
            scalar = _scalar_or_none(value)
            if key != "step" and scalar is not None:
                self._tensorboard.add_scalar(key, scalar, step)
        self._tensorboard.flush()

    def _log_wandb(self, record: Mapping[str, Any], step: int) -> None:
        payload = {k: v for k, v in record.items() if k != "step" and v is not None}
        try:
            self._wandb_run.log(payload, step=step)
        except Exception as exc:  # network hiccups must not kill training
            warnings.warn(f"wandb logging failed at step {step}: {exc}", RuntimeWarning, stacklevel=3)


def _normalize_backends(report_to: str | Sequence[str] | None, warn: bool = True) -> frozenset[str]:
    """Parse ``report_to`` (a name, a list, "all" or "none") and warn about unknown names."""
    if report_to is None:
        return frozenset()
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    names = [n.strip().lower() for n in names]
    if "all" in names:
        return _KNOWN_BACKENDS
    unknown = sorted(set(names) - _KNOWN_BACKENDS - {"none"})
    if unknown and warn:
        warnings.warn(
            f"Unknown metrics backend(s) {unknown}; supported: {sorted(_KNOWN_BACKENDS)}. Ignoring them.",
            UserWarning,
            stacklevel=3,
        )
    return frozenset(names) & _KNOWN_BACKENDS


def _open_tensorboard(output_dir: Path, run_name: str | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch ships the wrapper, but it needs the `tensorboard` package
        warnings.warn(
            f"report_to includes 'tensorboard' but it is unavailable ({exc}); "
            "install `tensorboard` to enable it. Continuing with the JSONL log only.",
            UserWarning,
            stacklevel=3,
        )
        return None
    return SummaryWriter(log_dir=str(output_dir / "tensorboard" / (run_name or "run")))


def _open_wandb(output_dir: Path, run_name: str | None) -> Any:
    try:
        import wandb
    except ImportError:
        warnings.warn(
            "report_to includes 'wandb' but wandb is not installed; continuing without it.",
            UserWarning,
            stacklevel=3,
        )
        return None
    try:
        # Reuse a run the user already started (e.g. from a notebook or sweep agent).
        return wandb.run or wandb.init(name=run_name, dir=str(output_dir))
    except Exception as exc:  # login / network problems
        warnings.warn(f"wandb.init failed ({exc}); continuing without wandb.", UserWarning, stacklevel=3)
        return None


# --------------------------------------------------------------------------- reading / plotting


def read_metrics(jsonl_path: str | Path) -> list[dict[str, Any]]:
    """Parse a metrics JSONL file, skipping blank or truncated lines (e.g. from a crash)."""
    records: list[dict[str, Any]] = []
    with open(jsonl_path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "step" in record:
                records.append(record)
    return records


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Points for ``key`` ordered by step; null becomes NaN so the line shows a gap.

    When a step appears twice (a run resumed from an earlier checkpoint re-logs
    it) the later line wins, because it belongs to the run that continued.
    """
    by_step: dict[int, float] = {}
    for record in records:
        if key in record:
            value = _scalar_or_none(record[key])
            by_step[int(record["step"])] = math.nan if value is None else value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _available_keys(records: Sequence[Mapping[str, Any]], keys: Sequence[str] | None) -> list[str]:
    present: dict[str, None] = {}
    for record in records:
        present.update(dict.fromkeys(k for k in record if k != "step"))
    if keys is None:
        return list(present)
    return [k for k in keys if k in present]


def build_metrics_figure(records: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> Any:
    """A matplotlib Figure with one subplot per key, stacked vertically and sharing x."""
    # Figure + Agg canvas instead of pyplot: no global state, no GUI backend lookup,
    # and no figures leaking in long runs that plot repeatedly.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_rows = max(len(keys), 1)
    figure = Figure(figsize=(8, 2.6 * n_rows), layout="constrained")
    FigureCanvasAgg(figure)
    if not keys:
        axis = figure.add_subplot(1, 1, 1)
        axis.text(0.5, 0.5, "no matching metrics logged yet", ha="center", va="center")
        axis.set_axis_off()
        return figure
    axes = figure.subplots(n_rows, 1, sharex=True, squeeze=False)[:, 0]
    for axis, key in zip(axes, keys, strict=True):
        steps, values = _series(records, key)
        axis.plot(steps, values, marker="." if len(steps) < 50 else None, linewidth=1.2)
        axis.set_title(key, fontsize=10)
        axis.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    return figure


def plot_metrics(
    jsonl_path: str | Path,
    png_path: str | Path,
    keys: Sequence[str] | None = DEFAULT_PLOT_KEYS,
) -> Path:
    """Render the metrics in ``jsonl_path`` to ``png_path``; ``keys=None`` plots every key.

    Keys absent from the log are skipped, so the default set works for any run.
    """
    records = read_metrics(jsonl_path)
    figure = build_metrics_figure(records, _available_keys(records, keys))
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, dpi=100)
    return png_path


# --------------------------------------------------------------------------- console


def _format_value(value: Any, precision: int) -> str:
    value = to_jsonable(value)
    if value is None:
        return "nan"
    if isinstance(value, int):  # bool is an int subclass
        return str(value)
    if isinstance(value, float):
        return f"{value:.{precision}g}"
    return str(value)


def format_metrics(metrics: Mapping[str, Any], keys: Sequence[str] | None = None, precision: int = 4) -> str:
    """One compact line such as ``reward=0.512 kl=0.00312 mean_length=87.5`` for a progress bar.

    Only the last path component of a key is shown (``completions/mean_length``
    becomes ``mean_length``) unless that would collide with another key.
    """
    selected = [k for k in (keys if keys is not None else metrics) if k in metrics and k != "step"]
    short = {k: k.rsplit("/", 1)[-1] for k in selected}
    collisions = {name for name in short.values() if list(short.values()).count(name) > 1}
    parts = []
    for key in selected:
        label = key if short[key] in collisions else short[key]
        parts.append(f"{label}={_format_value(metrics[key], precision)}")
    return " ".join(parts)
