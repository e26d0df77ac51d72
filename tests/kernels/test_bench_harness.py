"""The kernel benchmark's LM-head case and launch-bound spread, run on the CPU at toy sizes.

Its timings mean nothing here; what is checked is that the case measures the trainer's path
(head output unsliced, backward into the head) and that every row agrees with the others.
"""
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"


@pytest.fixture(scope="module")
def bk():
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_kernels", mod)
    spec.loader.exec_module(mod)
    return mod


def test_head_case_rows_agree_and_launch_bound_cases_report_a_range(bk, seed):
    peers = bk.load_peers()
    h = bk.HeadInputs(2, 5, 32, 97, "cpu", peers.ref, seed=seed)
    assert h.hidden.is_leaf and tuple(h.head(h.hidden).shape) == (2, 6, 97)
    case = bk.head_loss_case(h, peers)
    case.repeats = 2
    keys = [i.key for i in case.impls]
    assert keys[:2] == ["ours", "ours_sliced"] and "eager" in keys and "head" in keys
    dev = bk.Device("cpu", budget_ms=0.0, max_reps=1)
    rows = dict(zip(keys, bk.run_case(case, dev, is_logp=False)))
    for key in ("ours", "ours_sliced", "eager"):
        assert rows[key].sane == "ok" and rows[key].timing is not None, (key, rows[key].note)
        assert len(rows[key].timing.repeats) == 2
    # The sliced path computes the same thing; the reference agrees to float32 rounding.
    assert rows["ours_sliced"].vs_ours == "out Δmax 0.0e+00, grad rel 0.0e+00"
    ref_grad_rel = float(rows["ours"].vs_ref.split("grad rel ")[1])
    assert ref_grad_rel < 2e-2  # bf16 logits and d(logits)
    assert rows["head"].vs_ours == "" and rows["head"].vs_ref == ""
    table = bk.case_table(case, list(rows.values()), copy_bw=1e12)
    assert "min-max of 2 repeats" in table and "Launch-bound" in table
