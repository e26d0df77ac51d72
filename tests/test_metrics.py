"""Tests for atlas_fast.metrics: JSONL logging, null-object behaviour, plots, console format."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from atlas_fast.metrics import (
    MetricsLogger,
    build_metrics_figure,
    format_metrics,
    plot_metrics,
    read_metrics,
    to_jsonable,
)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_log_writes_one_json_line_per_call_with_plain_floats(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log({"reward": torch.tensor(0.5), "kl": np.float32(0.25), "n": np.int64(3)}, step=1)
        # Visible before close: each line is flushed so a crash keeps it.
        assert _lines(tmp_path / "metrics.jsonl") == [{"step": 1, "reward": 0.5, "kl": 0.25, "n": 3}]
        logger.log({"reward": 1.0, "lengths": torch.tensor([1.0, 2.0])}, step=2)
    records = _lines(tmp_path / "metrics.jsonl")
    assert records[1] == {"step": 2, "reward": 1.0, "lengths": [1.0, 2.0]}
    assert isinstance(records[0]["reward"], float)


def test_non_finite_values_are_written_as_null(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log({"loss": float("nan"), "kl": torch.tensor(float("inf")), "x": np.float64("nan")}, step=3)
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"step": 3, "loss": None, "kl": None, "x": None}


def test_logger_appends_across_instances(tmp_path):
    for step in (1, 2):
        with MetricsLogger(tmp_path) as logger:
            logger.log({"reward": float(step)}, step=step)
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2]


def test_non_main_process_logger_writes_nothing(tmp_path):
    out = tmp_path / "run"
    logger = MetricsLogger(out, report_to=("jsonl", "tensorboard", "wandb", "bogus"), is_main_process=False)
    logger.log({"reward": 1.0}, step=1)
    assert logger.log_completions(1, [{"prompt": "p", "completion": "c"}]) is None
    logger.close()
    assert not out.exists()


def test_unknown_backend_warns_but_still_logs(tmp_path):
    with pytest.warns(UserWarning, match="Unknown metrics backend"):
        logger = MetricsLogger(tmp_path, report_to=["jsonl", "mlflow-ish"])
    logger.log({"reward": 1.0}, step=1)
    logger.close()
    assert _lines(tmp_path / "metrics.jsonl") == [{"step": 1, "reward": 1.0}]


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_missing_optional_backend_warns_instead_of_crashing(tmp_path, monkeypatch, backend):
    # Force the import to fail even where the package happens to be installed.
    import builtins

    real_import = builtins.__import__
    blocked = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}[backend]

    def fake_import(name, *args, **kwargs):
        if name == blocked:
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.warns(UserWarning, match=backend):
        logger = MetricsLogger(tmp_path, report_to=("jsonl", backend))
    logger.log({"reward": 1.0}, step=1)
    logger.close()
    assert (tmp_path / "metrics.jsonl").exists()


def test_report_to_none_and_plain_string_are_accepted(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MetricsLogger(tmp_path / "a", report_to="none").close()
        MetricsLogger(tmp_path / "b", report_to="jsonl").close()


def test_log_completions_writes_one_row_per_sample(tmp_path):
    rows = [
        {"prompt": "2+2?", "completion": "4", "rewards": {"acc": torch.tensor(1.0)}, "advantage": np.float32(0.5)},
        {"prompt": "2+3?", "completion": "6", "rewards": {"acc": 0.0}, "advantage": -0.5},
    ]
    with MetricsLogger(tmp_path) as logger:
        path = logger.log_completions(7, rows)
    assert path == tmp_path / "completions" / "step-7.jsonl"
    assert _lines(path) == [
        {"prompt": "2+2?", "completion": "4", "rewards": {"acc": 1.0}, "advantage": 0.5},
        {"prompt": "2+3?", "completion": "6", "rewards": {"acc": 0.0}, "advantage": -0.5},
    ]


def _write_log(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_plot_metrics_writes_png_with_one_subplot_per_present_key(tmp_path):
    log = tmp_path / "metrics.jsonl"
    _write_log(
        log,
        [
            {"step": 1, "reward": 0.1, "kl": None, "completions/mean_length": 10},
            {"step": 2, "reward": None, "kl": 0.01, "completions/mean_length": 12},
            {"step": 3, "reward": 0.4, "kl": 0.02},
        ],
    )
    with log.open("a") as handle:
        handle.write('{"step": 4, "rew')  # truncated line from a crash

    png = plot_metrics(log, tmp_path / "plots" / "metrics.png", keys=("reward", "kl", "absent"))
    assert png == tmp_path / "plots" / "metrics.png"
    assert png.stat().st_size > 0
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG"
        two_panel_height = image.size[1]

    three = plot_metrics(log, tmp_path / "three.png")  # default keys, all present
    with Image.open(three) as image:
        assert image.size[1] > two_panel_height

    records = read_metrics(log)
    assert len(records) == 3
    figure = build_metrics_figure(records, ["reward", "kl"])
    assert [axis.get_title() for axis in figure.axes] == ["reward", "kl"]
    ys = figure.axes[0].lines[0].get_ydata()
    assert math.isnan(ys[1]) and ys[2] == pytest.approx(0.4)


def test_plot_metrics_later_duplicate_step_wins_and_empty_log_still_plots(tmp_path):
    log = tmp_path / "metrics.jsonl"
    _write_log(log, [{"step": 1, "reward": 0.0}, {"step": 2, "reward": 5.0}, {"step": 2, "reward": 1.0}])
    figure = build_metrics_figure(read_metrics(log), ["reward"])
    assert list(figure.axes[0].lines[0].get_ydata()) == [0.0, 1.0]

    _write_log(log, [{"step": 1, "loss": 1.0}])
    png = plot_metrics(log, tmp_path / "none.png")
    with Image.open(png) as image:
        image.verify()


def test_format_metrics_is_compact():
    text = format_metrics(
        {"step": 4, "reward": torch.tensor(0.51234), "kl": 0.000123456, "completions/mean_length": 87, "loss": None}
    )
    assert text == "reward=0.5123 kl=0.0001235 mean_length=87 loss=nan"
    assert format_metrics({"a/x": 1, "b/x": 2, "y": 3.0}, keys=["b/x", "y", "zz"]) == "x=2 y=3"
    assert format_metrics({"a/x": 1, "b/x": 2}) == "a/x=1 b/x=2"


def test_to_jsonable_handles_nested_structures():
    value = {"t": torch.tensor([[1, 2]]), "n": (np.float16(0.5), float("-inf")), "b": np.bool_(True)}
    assert to_jsonable(value) == {"t": [[1, 2]], "n": [0.5, None], "b": True}


def test_a_resumed_log_starts_on_its_own_line_after_a_partial_one(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log({"reward": 1.0}, step=1)
    logger.log({"reward": 2.0}, step=2)
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "rew')  # the process died mid-write
    logger = MetricsLogger(tmp_path)
    logger.log({"reward": 3.0}, step=3)
    logger.log({"reward": 4.0}, step=4)
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
