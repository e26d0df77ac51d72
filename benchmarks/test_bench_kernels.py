"""pytest-benchmark entries for the atlas_kernels ops and their peers, at a moderate shape.

    pytest benchmarks/test_bench_kernels.py --benchmark-columns=median,iqr,rounds

The implementations and inputs are the ones `bench_kernels.py` builds, so both time the same
work; that script adds bandwidth, floors, memory and agreement checks. Peers that do not import
are skipped with the reason. Timings use the host clock around a synchronised call; in-place
rows get a fresh logits copy in the (untimed) setup. Nothing asserts on the timings.
"""
from __future__ import annotations

import pytest
import torch

import bench_kernels as bk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

B, T = 4, 512  # N = 2048 tokens: about 0.6 GB of bf16 logits at V = 151936
VOCABS = (151936, 32000)
TOK_B, TOK_T = 256, 2048
ADV_B, GROUP = 1024, 8
ROUNDS, WARMUP = 20, 3


@pytest.fixture(scope="module")
def peers():
    bk._raise_recompile_limits()  # the compiled references meet several shapes and grad modes
    return bk.load_peers()


@pytest.fixture(scope="module", params=VOCABS, ids=lambda v: f"V{v}")
def logits_inputs(request, peers):
    if peers.ref is None:
        pytest.skip(peers.ref_reason)
    x = bk.LogitsInputs(B, T, request.param, "cuda", peers.ref, seed=7)
    yield x
    del x
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def head_inputs(peers):
    if peers.ref is None:
        pytest.skip(peers.ref_reason)
    h = bk.HeadInputs(B, T, 896, 151936, "cuda", peers.ref, seed=10)  # Qwen2.5-0.5B's head width
    yield h
    del h
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def token_inputs():
    return bk.TokenInputs(TOK_B, TOK_T, "cuda", seed=8)


def _run(benchmark, case: bk.Case, key: str) -> None:
    impl = next((i for i in case.impls if i.key == key), None)
    if impl is None:
        pytest.skip(f"no '{key}' row in this case")
    if impl.fn is None:
        pytest.skip(impl.na)

    def setup():
        if impl.restore is not None:
            impl.restore()
        torch.cuda.synchronize()  # nothing queued earlier leaks into the timed call

    def target():
        impl.fn()
        torch.cuda.synchronize()

    benchmark.extra_info.update(impl=impl.name, case=case.title, bytes=case.bytes_moved)
    try:
        benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    finally:
        if impl.restore is not None:
            impl.restore()  # later tests read these logits
    median = benchmark.stats.stats.median if benchmark.stats else None
    if median:
        benchmark.extra_info["TB/s"] = round(case.bytes_moved / median / 1e12, 3)


@pytest.mark.parametrize("key", ["ours", "ours_entropy", "eager", "compile", "trl", "liger"])
def test_selective_forward(benchmark, logits_inputs, peers, key):
    benchmark.group = f"selective fwd V={logits_inputs.V}"
    _run(benchmark, bk.selective_forward_case(logits_inputs, peers, use_compile=True), key)


@pytest.mark.parametrize("key", ["ours", "ours_inplace", "eager", "compile", "trl"])
def test_selective_fwd_bwd(benchmark, logits_inputs, peers, key):
    benchmark.group = f"selective fwd+bwd V={logits_inputs.V}"
    _run(benchmark, bk.selective_fwd_bwd_case(logits_inputs, peers, use_compile=True), key)


@pytest.mark.parametrize("key", ["ours_inplace", "ours", "eager", "trl", "liger_inplace", "liger"])
def test_grpo_loss_from_logits(benchmark, logits_inputs, peers, key):
    benchmark.group = f"grpo loss from logits fwd+bwd V={logits_inputs.V}"
    _run(benchmark, bk.loss_from_logits_case(logits_inputs, peers), key)


@pytest.mark.parametrize("key", ["ours", "ours_sliced", "liger", "eager", "head"])
def test_grpo_loss_through_lm_head(benchmark, head_inputs, peers, key):
    benchmark.group = "grpo loss through a Qwen2 lm_head, fwd+bwd"
    _run(benchmark, bk.head_loss_case(head_inputs, peers), key)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("key", ["ours", "eager", "compile"])
def test_grpo_loss_tokens(benchmark, token_inputs, peers, key, backward):
    benchmark.group = f"grpo loss tokens {'fwd+bwd' if backward else 'fwd'}"
    _run(benchmark, bk.token_loss_case(token_inputs, peers, use_compile=True, backward=backward), key)


@pytest.mark.parametrize("key", ["ours", "eager", "compile"])
def test_group_advantages(benchmark, peers, key):
    benchmark.group = "group advantages"
    _run(benchmark, bk.advantages_case(ADV_B, GROUP, "cuda", peers, use_compile=True, seed=9), key)
