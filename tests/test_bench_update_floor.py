"""benchmarks/bench_update_floor.py's bookkeeping, on the CPU: which passes its floor counts, and a
smoke run of the whole script at toy sizes."""
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_update_floor.py"


@pytest.fixture(scope="module")
def bf():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_update_floor_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_floor_counts_two_forwards_one_backward_and_the_recompute(bf, monkeypatch):
    from shapes import Shape

    shape = Shape("toy", 64, 3, 4, 2, 96, 1000)
    calls = []

    def linear_ms(T, ins, outs, device, reps):
        calls.append((T, ins, outs))
        return (1.0, 2.0) if outs != (1000,) else (10.0, 20.0)  # body projections, LM head

    monkeypatch.setattr(bf, "linear_ms", linear_ms)
    monkeypatch.setattr(bf, "attention_ms", lambda *a: (0.5, 1.5, "flash"))
    monkeypatch.setattr(bf, "adamw_ms", lambda numels, device, reps: 7.0)
    r = bf.update_floor(shape, 16, "cpu", 1, 1000)
    layer_f, layer_b = 4 * 1.0 + 0.5, 4 * 2.0 + 1.5  # q/k/v, o, gate/up, down + attention
    assert (r["layer_f"], r["layer_b"]) == (layer_f, layer_b)
    plain = 2 * (3 * layer_f + 10.0) + 3 * layer_b + 20.0 + 7.0  # reference + policy forwards, backward, AdamW
    assert r["floor"] == pytest.approx(plain / 1e3)
    assert r["floor_ckpt"] == pytest.approx((plain + 3 * layer_f) / 1e3)  # the body once more, not the head
    T = 8 * (256 + 16)
    assert (T, 64, (64, 32, 32)) in calls and (T, 96, (64,)) in calls  # grouped k/v heads: 2 x 16 wide
    assert (8 * 16, 64, (1000,)) in calls  # the head sees the completion's tokens only


def test_linear_takes_the_faster_of_separate_and_concatenated(bf, monkeypatch):
    times = iter([3.0, 4.0, 2.0, 5.0])  # separate: fwd 3 bwd 4; concatenated: fwd 2 bwd 5
    monkeypatch.setattr(bf, "timed_ms", lambda fn, device, reps: next(times))
    assert bf.linear_ms(8, 16, (16, 8), "cpu", 1) == (2.0, 4.0)


def test_smoke_run_writes_its_section(bf, tmp_path):
    out = tmp_path / "RESULTS.md"
    assert bf.main(["--device", "cpu", "--out", str(out)]) == 0
    text = out.read_text()
    assert "<!-- update_floor:start -->" in text and "| tiny | 16 | 2176 |" in text
    assert "4 GEMMs (recompute)" in text
