"""benchmarks/bench_e2e.py's bookkeeping, on the CPU: the arguments of its TRL+Liger child
processes and the result table's ratios."""
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_e2e.py"


@pytest.fixture(scope="module")
def be():
    spec = importlib.util.spec_from_file_location("bench_e2e_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


def test_without_options_drops_both_spellings(be):
    argv = ["--quick", "--cases", "update", "--shapes=0.5b", "--steps", "8", "--lengths", "1024,2048", "--set", "x=1"]
    assert be.without_options(argv, ("--cases", "--shapes", "--lengths")) == ["--quick", "--steps", "8", "--set", "x=1"]


def test_each_liger_update_case_and_fit_length_gets_its_own_process(be):
    plan = be.make_plan("cuda", quick=False)
    plan.shapes, plan.lengths, plan.fit_shapes, plan.fit_lengths = ["0.5b", "1.5b"], [1024, 2048], ["1.5b"], [16, 32, 64]
    ladders = be.liger_scopes(plan, {"update", "fit", "step"})
    updates = [ladder for ladder in ladders if ladder[0][1] == "update"]
    assert [ladder[0] for ladder in updates] == [
        ["--cases", "update", "--shapes", s, "--lengths", str(C)] for s in ("0.5b", "1.5b") for C in (1024, 2048)]
    assert all(len(ladder) == 1 for ladder in updates)
    fits = [ladder for ladder in ladders if ladder[0][1] == "fit"]
    assert fits == [[["--cases", "fit", "--shapes", "1.5b", "--fit-lengths", str(C)] for C in (16, 32, 64)]]
    plan.fit_systems = ("atlas-fast lean", "TRL")
    assert not [ladder for ladder in be.liger_scopes(plan, {"fit"})]


def test_result_table_ratios_and_leftover_note(be):
    R = be.Result
    rows = [R("update", "s", "atlas-fast", 8, step_s=0.5, peak_gib=2.0, notes={"leftover_gib": 1.5}),
            R("update", "s", "TRL", 8, step_s=1.0, peak_gib=4.0),
            R("update", "s", "TRL+Liger", 8, step_s=0.8, peak_gib=3.2)]
    table = be.result_table(rows, "t")
    assert "| s | 8 | atlas-fast | 0.500 s | 2.00 GiB | 0.50x | 0.62x | 0.50x | 0.62x |" in table
    assert "s / 8 / atlas-fast: 1.50 GiB" in table


def test_the_step_table_compares_each_shape_with_its_own_trl_row(be):
    rows = [be.Result("step", "small", "atlas-fast", 512, step_s=2.0, tokens=1000),
            be.Result("step", "small", "TRL", 512, step_s=12.0, tokens=1000),
            be.Result("step", "large", "atlas-fast", 512, step_s=3.0, tokens=1000),
            be.Result("step", "large", "TRL", 512, step_s=21.0, tokens=1000)]
    speed = {(line.split(" | ")[0][2:], line.split(" | ")[1]): line.split(" | ")[-1].rstrip(" |")
             for line in be.step_table(rows).splitlines() if line.startswith("| small") or line.startswith("| large")}
    assert speed == {("small", "atlas-fast"): "6.00x", ("small", "TRL"): "1.00x",
                     ("large", "atlas-fast"): "7.00x", ("large", "TRL"): "1.00x"}
