"""The engine's sampler draws from the intended distribution.

For each setting, 40,000 draws from one fixed logit vector are compared with the exact processed
distribution, computed here independently in float64 from its definition (sampling.py's
docstring): a chi-square goodness-of-fit test, with tokens the setting removes never drawn. Seeds
are fixed, so each test is deterministic; each setting is also checked against a slightly wrong
distribution, which the same test must reject (the test has power).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from atlas_fast.rollout import SamplingParams
from atlas_fast.rollout.engine.sampling import chosen_logprobs, process, sample

from .engine_models import one_thread  # noqa: F401 (an autouse fixture)

LOGITS = [0.7, 2.0, -1.0, 1.2, -3.0, 1.5, 0.0, -0.4, 0.3, -1.5, 1.9]  # V = 11, ranks not in index order
DRAWS = 40_000


def expected(params: SamplingParams, seen: tuple[int, ...] = (), step: int = 0, stops: tuple[int, ...] = (),
             min_p_last: bool = False) -> list[float]:
    """The processed distribution, from the definition, in float64 (`min_p_last`: in transformers'
    order instead, min_p after top-k/top-p)."""
    logits = list(LOGITS)
    for i in seen:  # repetition penalty
        logits[i] = logits[i] / params.repetition_penalty if logits[i] > 0 else logits[i] * params.repetition_penalty
    alive = set(range(len(logits)))
    if step < params.min_tokens:
        alive -= set(stops)

    def probs(keep):
        m = max(logits[i] / params.temperature for i in keep)
        w = {i: math.exp(logits[i] / params.temperature - m) for i in keep}
        total = sum(w.values())
        return {i: w[i] / total for i in keep}

    def min_p(alive):
        p = probs(alive)
        top = max(p.values())
        return {i for i in alive if p[i] >= params.min_p * top}

    if params.min_p > 0 and not min_p_last:  # vLLM's order: min_p before top-k/top-p
        alive = min_p(alive)
    order = sorted(alive, key=lambda i: -logits[i])
    if params.top_k > 0:
        alive = set(order[: params.top_k])
        order = order[: params.top_k]
    if params.top_p < 1:
        p, kept, mass = probs(alive), set(), 0.0
        for i in order:  # the smallest prefix of the ranking whose mass reaches top_p
            if mass < params.top_p:
                kept.add(i)
                mass += p[i]
        alive = kept
    if params.min_p > 0 and min_p_last:
        alive = min_p(alive)
    p = probs(alive)
    return [p.get(i, 0.0) for i in range(len(logits))]


def chi_square_p(counts: torch.Tensor, probs: list[float]) -> float:
    """Goodness-of-fit p-value (scipy.stats.chisquare's, from the regularised upper incomplete gamma)."""
    probs_t = torch.tensor(probs, dtype=torch.float64)
    support = probs_t > 0
    exp = probs_t[support] * counts.sum()
    obs = counts[support].double()
    small = exp < 5  # the chi-square approximation needs expected counts >= 5: pool the rare tokens
    if small.any():
        exp = torch.cat([exp[~small], exp[small].sum()[None]])
        obs = torch.cat([obs[~small], obs[small].sum()[None]])
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = len(exp) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2).item()


def draw_counts(params: SamplingParams, seen: tuple[int, ...] = (), step: int = 0, stops: tuple[int, ...] = (),
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    V = len(LOGITS)
    logits = torch.tensor(LOGITS).expand(DRAWS, V)  # [DRAWS, V]
    seen_mask = torch.zeros(DRAWS, V, dtype=torch.bool)
    seen_mask[:, list(seen)] = True
    stop_mask = torch.zeros(V, dtype=torch.bool)
    stop_mask[list(stops)] = True
    gen = torch.Generator().manual_seed(seed)
    tokens, logps = sample(logits, params, step, seen_mask if seen else None, stop_mask if stops else None, gen, True)
    return torch.bincount(tokens, minlength=V), logps


CASES = {
    "temperature": (SamplingParams(max_tokens=1, temperature=0.6), SamplingParams(max_tokens=1, temperature=0.7)),
    "high-temperature": (SamplingParams(max_tokens=1, temperature=1.8), SamplingParams(max_tokens=1, temperature=1.6)),
    "top_k": (SamplingParams(max_tokens=1, top_k=4), SamplingParams(max_tokens=1, top_k=5)),
    "top_p": (SamplingParams(max_tokens=1, top_p=0.8, temperature=0.9), SamplingParams(max_tokens=1, top_p=0.9, temperature=0.9)),
    "min_p": (SamplingParams(max_tokens=1, min_p=0.2), SamplingParams(max_tokens=1, min_p=0.1)),
    "all": (SamplingParams(max_tokens=1, temperature=1.3, top_k=7, top_p=0.9, min_p=0.05),
            SamplingParams(max_tokens=1, temperature=1.3, top_k=7, top_p=0.95, min_p=0.05)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_draws_follow_the_processed_distribution(name):
    params, wrong = CASES[name]
    counts, logps = draw_counts(params)
    want = expected(params)
    assert all(c == 0 for c, p in zip(counts.tolist(), want) if p == 0)  # filtered tokens are never drawn
    assert chi_square_p(counts, want) > 1e-3
    assert chi_square_p(counts, expected(wrong)) < 1e-6  # the test tells a close but wrong distribution apart
    assert sum(p > 0 for p in want) < len(LOGITS) or name.endswith("temperature")  # filters removed tokens


def test_min_p_comes_before_top_p_as_in_vllm():
    params = SamplingParams(max_tokens=1, top_p=0.6, min_p=0.3)
    assert expected(params) != expected(params, min_p_last=True)  # a setting where the order matters
    counts, _ = draw_counts(params)
    assert chi_square_p(counts, expected(params)) > 1e-3
    assert chi_square_p(counts, expected(params, min_p_last=True)) < 1e-6


@pytest.mark.parametrize("penalty", [1.6, 0.7])
def test_repetition_penalty(penalty):
    seen = (1, 2, 6, 8)  # positive, negative and zero logits
    params = SamplingParams(max_tokens=1, repetition_penalty=penalty)
    counts, _ = draw_counts(params, seen=seen)
    assert chi_square_p(counts, expected(params, seen=seen)) > 1e-3
    assert chi_square_p(counts, expected(SamplingParams(max_tokens=1), seen=seen)) < 1e-6


def test_min_tokens_forbids_stops_until_reached():
    params = SamplingParams(max_tokens=8, min_tokens=3, temperature=1.2)
    stops = (1, 10)  # the two most likely tokens
    early, _ = draw_counts(params, step=2, stops=stops)
    assert early[list(stops)].sum() == 0
    assert chi_square_p(early, expected(params, step=2, stops=stops)) > 1e-3
    late, _ = draw_counts(params, step=3, stops=stops)
    assert chi_square_p(late, expected(params, step=3, stops=stops)) > 1e-3


@pytest.mark.parametrize("name", ["temperature", "top_p", "all"])
def test_logprobs_are_those_of_the_processed_distribution(name):
    params, _ = CASES[name]
    gen = torch.Generator().manual_seed(1)
    logits = torch.tensor(LOGITS).expand(64, -1)
    tokens, logps = sample(logits, params, 0, None, None, gen, True)
    want = torch.tensor(expected(params), dtype=torch.float64).log()
    assert torch.allclose(logps.double(), want[tokens], atol=1e-5)
    assert (logps <= 0).all() and torch.isfinite(logps).all()


def test_greedy_is_argmax_after_penalties():
    logits = torch.tensor(LOGITS)[None]
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    assert sample(logits, greedy, 0, None, None, None, False)[0].item() == 1
    seen = torch.zeros(1, len(LOGITS), dtype=torch.bool)
    seen[0, 1] = True
    penalised = SamplingParams(max_tokens=4, temperature=0.0, repetition_penalty=2.0)
    assert sample(logits, penalised, 0, seen, None, None, False)[0].item() == 10  # 2.0 -> 1.0 drops below 1.9
    lp = chosen_logprobs(process(logits, greedy, 0), torch.tensor([1]))
    assert lp.item() == pytest.approx(torch.tensor(LOGITS).log_softmax(-1)[1].item())


def test_seeded_draws_repeat_and_differ_across_seeds():
    params = SamplingParams(max_tokens=1, temperature=1.0)
    a, _ = draw_counts(params, seed=5)
    b, _ = draw_counts(params, seed=5)
    c, _ = draw_counts(params, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)


NEEDS_TRITON = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                  reason="needs CUDA or the Triton interpreter")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def softmax64(logits: torch.Tensor, temperature: float) -> list[float]:
    """softmax(logits / T) of one row, in float64 from the (possibly bf16-rounded) values given."""
    return (logits.double() / temperature).softmax(-1).tolist()


def small_blocks(monkeypatch, chunks: int):
    """Blocks of 16 tokens (a vocabulary of 50 is 3 full blocks and one of 2) over `chunks` chunks."""
    from atlas_fast.rollout.engine import sample_kernel

    monkeypatch.setattr(sample_kernel, "BLOCK_V", 16)
    monkeypatch.setattr(sample_kernel, "PROGRAMS_PER_SM", 1 if chunks == 1 else 10_000)
    return sample_kernel


# fp32 at V = 11 (one block); bf16 at V = 50 over four blocks of 16 (the last one of 2 tokens), with
# a banned token, at a temperature above 1. One chunk per row: splitting changes no draw (below), and
# each program costs ~3-8 ms in the interpreter. Draws through the interpreter: 1,200 and 600 (the
# wrong temperature's p-value is then ~2e-8 at V = 50).
SAMPLER_CASES = {"fp32-one-block": (0.7, torch.float32, False, (400, 3)),
                 "bf16-four-blocks": (1.3, torch.bfloat16, True, (300, 2))}


@NEEDS_TRITON
@pytest.mark.parametrize("case", list(SAMPLER_CASES))
def test_inverse_cdf_sampler_follows_softmax_over_temperature(case, monkeypatch):
    from atlas_fast.rollout.engine import sample_kernel

    temperature, dtype, blocks, cpu_draws = SAMPLER_CASES[case]
    if not blocks:
        row = torch.tensor(LOGITS)
    else:
        small_blocks(monkeypatch, chunks=1)
        row = 1.5 * torch.randn(50, generator=torch.Generator().manual_seed(7))
        row[20] = float("-inf")
    row = row.to(dtype)
    V = row.shape[0]
    # One row per draw: 20,000 draws on a GPU, rows x steps of cpu_draws through the interpreter.
    rows, steps = (4000, 5) if TRITON_DEVICE == "cuda" else cpu_draws
    logits = row.expand(rows, -1).contiguous().to(TRITON_DEVICE)
    counts = torch.zeros(V, dtype=torch.long)
    for step in range(steps):  # a fresh seed each step, as the engine does
        tokens, logps = sample_kernel.sample_tokens(logits, temperature, seed=1234 + step)
        counts += torch.bincount(tokens.cpu(), minlength=V)
        log_want = (row.double() / temperature).log_softmax(-1)
        assert torch.allclose(logps.cpu().double(), log_want[tokens.cpu()], atol=1e-5)
        assert (logps <= 0).all()
    want = softmax64(row, temperature)
    assert all(c == 0 for c, p in zip(counts.tolist(), want) if p == 0)  # the -inf token is never drawn
    assert chi_square_p(counts, want) > 1e-3
    wrong = temperature * (1.15 if TRITON_DEVICE == "cuda" else 1.6)
    assert chi_square_p(counts, softmax64(row, wrong)) < 1e-6  # the test has power
    first, _ = sample_kernel.sample_tokens(logits[:50], temperature, seed=99)
    again, _ = sample_kernel.sample_tokens(logits[:50], temperature, seed=99)
    other, _ = sample_kernel.sample_tokens(logits[:50], temperature, seed=100)
    assert torch.equal(again, first) and not torch.equal(first, other)


@NEEDS_TRITON
def test_sampler_splits_the_vocabulary_without_changing_draws(monkeypatch):
    sample_kernel = small_blocks(monkeypatch, chunks=1)
    g = torch.Generator().manual_seed(4)
    logits = (3 * torch.randn(20, 50, generator=g)).to(TRITON_DEVICE)
    logits[:, 7] = float("-inf")  # a banned token must never be drawn
    one, lp_one = sample_kernel.sample_tokens(logits, 0.9, seed=11)  # one chunk per row
    small_blocks(monkeypatch, chunks=4)
    assert sample_kernel._chunks(20, 50, torch.device(TRITON_DEVICE))[0] == 4
    four, lp_four = sample_kernel.sample_tokens(logits, 0.9, seed=11)  # four chunks of 16
    assert torch.equal(one, four)  # the random stream is keyed by (seed, row), not by chunk
    assert torch.equal(lp_one, lp_four)  # and the per-block stats do not depend on the split
    want = (logits.double() / 0.9).log_softmax(-1).gather(1, four[:, None]).squeeze(1)
    torch.testing.assert_close(lp_four.double(), want, atol=1e-5, rtol=0)
    assert not (four == 7).any()


@NEEDS_TRITON
def test_sampler_skips_blocks_that_are_entirely_minus_inf(monkeypatch):
    """Blocks 1 (tokens 16-31) and 3 (48-49, the last) are all -inf; with four chunks one program sees
    nothing finite. Their stats must be (-inf, 0), not NaN, and no draw may land in them, even when
    the uniform rounds the target up to the total (the pick then takes the last block with weight)."""
    sample_kernel = small_blocks(monkeypatch, chunks=4)
    row = 2 * torch.randn(50, generator=torch.Generator().manual_seed(5))
    row[16:32] = float("-inf")
    row[48:] = float("-inf")
    logits = row.expand(200, -1).contiguous().to(TRITON_DEVICE)
    run_max, run_sum, _, meta = sample_kernel._block_stats(logits, 0.8, "test")
    assert run_max.shape == (200, 4) and meta["BLOCK"] == 16
    assert (run_max[:, [1, 3]] == float("-inf")).all() and (run_sum[:, [1, 3]] == 0).all()
    assert torch.isfinite(run_max[:, [0, 2]]).all() and (run_sum[:, [0, 2]] >= 1).all()
    tokens, logps = sample_kernel.sample_tokens(logits, 0.8, seed=3)
    allowed = torch.isfinite(row).to(TRITON_DEVICE)
    assert allowed[tokens].all()
    assert set(tokens.cpu().tolist()) & set(range(32, 48))  # the block after the empty one is reached
    want = (row.double() / 0.8).log_softmax(-1)[tokens.cpu()]
    torch.testing.assert_close(logps.cpu().double(), want, atol=1e-5, rtol=0)
    assert chi_square_p(torch.bincount(tokens.cpu(), minlength=50), softmax64(row, 0.8)) > 1e-3


@NEEDS_TRITON
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_single_finite_logit_is_always_drawn_at_log_prob_zero(monkeypatch, dtype):
    """Each row has one finite logit (first token, ends of blocks, the last token; large and small
    values): it is drawn every time, at log-prob exactly 0. A row with nothing finite draws token 0
    at log-prob -inf, never NaN."""
    sample_kernel = small_blocks(monkeypatch, chunks=4)
    where = [0, 15, 16, 33, 47, 49, 31]
    values = [-1e4, 3.0, 0.0, 50.0, -2.5, 1e3, -60.0]
    logits = torch.full((len(where) + 1, 50), float("-inf"))
    logits[torch.arange(len(where)), where] = torch.tensor(values)
    logits = logits.to(dtype).to(TRITON_DEVICE)
    for seed in (1, 2, 3):
        tokens, logps = sample_kernel.sample_tokens(logits, 0.6, seed=seed)
        assert tokens[:-1].cpu().tolist() == where
        assert (logps[:-1] == 0).all()
        assert tokens[-1].item() == 0 and logps[-1].item() == float("-inf")
