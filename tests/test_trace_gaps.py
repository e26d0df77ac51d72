"""benchmarks/trace_gaps.py on a hand-made Chrome trace: which stretches had no kernel running,
how busy the GPU was, and which host ops were open over each gap."""
import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "trace_gaps.py"


@pytest.fixture(scope="module")
def tg():
    spec = importlib.util.spec_from_file_location("trace_gaps", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _events():
    kernel = lambda ts, dur: {"ph": "X", "cat": "kernel", "name": "k", "ts": ts, "dur": dur}  # noqa: E731
    op = lambda ts, dur, name: {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur}  # noqa: E731
    return [
        kernel(0, 100), kernel(50, 100),  # overlapping: busy 0-150
        kernel(1150, 50),                 # 1000 us idle before it
        kernel(1300, 100),                # 100 us idle: under the threshold below
        op(100, 1200, "aten::linear"), op(500, 300, "aten::mm"), op(1250, 10, "aten::view"),
        {"ph": "i", "cat": "cpu_op", "name": "instant", "ts": 600},  # not a span: ignored
    ]


def test_gaps_and_busy_time(tg):
    idle, busy, span = tg.gaps(_events(), min_us=200)
    assert idle == [(150, 1150)]
    assert busy == 150 + 50 + 100  # overlapping kernels count once
    assert span == 1400


def test_report_names_the_ops_open_over_each_gap(tg, tmp_path, capsys, monkeypatch):
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": _events()}, f)
    monkeypatch.setattr(sys, "argv", ["trace_gaps.py", str(path), "--min-ms", "0.2"])
    tg.main()
    out = capsys.readouterr().out
    assert "kernels busy 0.3 ms, 1 gaps of >= 0.2 ms totalling 1.0 ms" in out
    assert "1.00  aten::linear > aten::mm" in out  # the gap's middle (650 us) is inside both
    assert "aten::view" not in out


def test_a_trace_without_kernels_is_refused(tg):
    with pytest.raises(SystemExit, match="no GPU kernels"):
        tg.gaps([{"ph": "X", "cat": "cpu_op", "name": "x", "ts": 0, "dur": 1}], min_us=1)


def test_host_ops_are_counted_per_thread(tg):
    op = lambda tid, name: {"ph": "X", "cat": "cpu_op", "name": name, "ts": 0, "dur": 1, "tid": tid}  # noqa: E731
    events = [op(1, "aten::mm"), op(1, "aten::mm"), op(2, "aten::mm"), op(2, "aten::add_"),
              {"ph": "X", "cat": "kernel", "name": "k", "ts": 0, "dur": 1, "tid": 7}]
    counts = tg.op_counts(events)
    assert counts.keys() == {1, 2}
    assert counts[1] == {"aten::mm": 2} and counts[2] == {"aten::mm": 1, "aten::add_": 1}
