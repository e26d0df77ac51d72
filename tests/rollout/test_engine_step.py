"""The decode step's fused bookkeeping: the one-pass sampler's last kernel also records each draw
(output row, log-prob, finished flag) and feeds it to the next step (input token, position).

It must leave exactly the state the unfused sequence leaves (sample_tokens, then the engine's
PyTorch bookkeeping) for the same seed: padding slots writing the dummy row, slots finished
before the step, with and without a stop mask and log-probs. End to end, generate() must return
the same completions either way. Triton runs through the interpreter on CPU.
"""
from __future__ import annotations

import os

import pytest
import torch

from atlas_fast.rollout import FINISH_LENGTH, FINISH_STOP, SamplingParams
from atlas_fast.rollout.engine import EngineBackend

from .engine_models import one_thread, tiny_decoder  # noqa: F401 (one_thread: an autouse fixture)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                                reason="needs CUDA or the Triton interpreter")
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"


def unfused_step(logits, temperature, seed, t, finished, rows, out_tokens, out_logps, stop_mask, positions, advance,
                 pad_id):
    """The reference: sample_tokens, then the engine's PyTorch bookkeeping -> the next tokens."""
    from atlas_fast.rollout.engine.sample_kernel import sample_tokens

    tokens, logps = sample_tokens(logits, temperature, seed)
    tokens = torch.where(finished, pad_id, tokens)
    out_tokens[rows, t] = tokens
    if out_logps is not None:
        out_logps[rows, t] = torch.where(finished, 0.0, logps)
    if stop_mask is not None:
        finished |= stop_mask[tokens]
    positions += advance
    return tokens


def step_inputs(B, N, V, T, dtype, seed):
    """A batch of B slots, N of them live (slots >= N pad to the dummy row N), some finished."""
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(B, V, generator=g)).to(dtype)
    logits[: B // 3, 5] += 8.0  # token 5 (a stop id below) is the likely draw of the first third
    logits[:, 11] = float("-inf")  # a banned token is never drawn
    finished = torch.arange(B) >= N
    finished[1] = finished[N - 2] = True  # live slots that stopped at an earlier step
    rows = torch.where(torch.arange(B) < N, torch.randperm(N, generator=g).repeat(2)[:B], N)  # shuffled by compaction
    positions = torch.randint(3, 40, (B,), generator=g)
    out_tokens = torch.randint(0, V, (N + 1, T), generator=g)  # earlier steps' draws must survive
    out_logps = -torch.rand(N + 1, T, generator=g)
    stop_mask = torch.zeros(V, dtype=torch.bool)
    stop_mask[[0, 5, 17]] = True  # 0 is the pad id: padding stays finished either way
    return [x.to(DEVICE) for x in (logits, finished, rows, positions, out_tokens, out_logps, stop_mask)]


@pytest.mark.parametrize("dtype,chunked", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["fp32-one-chunk", "bf16-four-chunks"])
@pytest.mark.parametrize("with_stop", [True, False], ids=["stop", "nostop"])
@pytest.mark.parametrize("with_logps", [True, False], ids=["logps", "nologps"])
def test_fused_record_matches_sample_then_pytorch_bookkeeping(monkeypatch, dtype, with_stop, with_logps, chunked):
    from atlas_fast.rollout.engine import sample_kernel

    if chunked:  # the pick reduces over several vocabulary chunks
        monkeypatch.setattr(sample_kernel, "BLOCK_V", 16)
        monkeypatch.setattr(sample_kernel, "PROGRAMS_PER_SM", 10_000)
    B, N, V, T, t, pad_id, temperature = 13, 10, 61, 9, 4, 0, 0.8
    logits, finished, rows, positions, out_tokens, out_logps, stop_mask = step_inputs(B, N, V, T, dtype, seed=3)
    if not with_logps:
        out_logps = None
    if not with_stop:
        stop_mask = None
    ref = dict(finished=finished.clone(), positions=positions.clone(), out_tokens=out_tokens.clone(),
               out_logps=out_logps.clone() if out_logps is not None else None)
    ref_tokens = unfused_step(logits, temperature, 77, t, ref["finished"], rows, ref["out_tokens"], ref["out_logps"],
                              stop_mask, ref["positions"], 1, pad_id)
    tokens = torch.full((B,), -1, dtype=torch.long, device=DEVICE)
    sample_kernel.sample_tokens_into(logits, temperature, 77, t=t, finished=finished, rows=rows,
                                     out_tokens=out_tokens, out_logps=out_logps, stop_mask=stop_mask, tokens=tokens,
                                     positions=positions, advance=1, pad_id=pad_id)
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(out_tokens, ref["out_tokens"])
    assert torch.equal(finished, ref["finished"])
    assert torch.equal(positions, ref["positions"])
    if with_logps:
        assert torch.equal(out_logps, ref["out_logps"])
        assert (out_logps[:N, t] <= 0).all() and not out_logps.isnan().any()
    # The cases the comparison must have covered: pad where finished, new stops, untouched columns.
    was_done = torch.arange(B, device=DEVICE) >= N
    was_done[1] = was_done[N - 2] = True
    assert (tokens[was_done] == pad_id).all() and (tokens[~was_done] != pad_id).any()
    assert not (tokens == 11).any()
    if with_stop:
        assert (finished & ~was_done).any()  # some live slot drew a stop id this step
    else:
        assert torch.equal(finished, was_done)


def test_fused_record_keeps_position_at_the_first_step_and_checks_its_inputs():
    from atlas_fast.rollout.engine.sample_kernel import sample_tokens_into

    logits, finished, rows, positions, out_tokens, out_logps, stop_mask = step_inputs(6, 5, 33, 4, torch.float32, 1)
    before = positions.clone()
    tokens = torch.zeros(6, dtype=torch.long, device=DEVICE)
    sample_tokens_into(logits, 1.0, 5, t=0, finished=finished, rows=rows, out_tokens=out_tokens, out_logps=out_logps,
                       stop_mask=stop_mask, tokens=tokens, positions=positions, advance=0, pad_id=0)
    assert torch.equal(positions, before)  # token 0 sits right after its prompt
    assert torch.equal(out_tokens[rows[:5], 0], tokens[:5])
    with pytest.raises(ValueError, match="positions"):
        sample_tokens_into(logits, 1.0, 5, t=0, finished=finished, rows=rows, out_tokens=out_tokens,
                           out_logps=out_logps, stop_mask=stop_mask, tokens=tokens, positions=positions.int(),
                           advance=0, pad_id=0)
    with pytest.raises(ValueError, match="step 4 outside"):
        sample_tokens_into(logits, 1.0, 5, t=4, finished=finished, rows=rows, out_tokens=out_tokens,
                           out_logps=out_logps, stop_mask=stop_mask, tokens=tokens, positions=positions,
                           advance=1, pad_id=0)


def test_generate_is_the_same_with_and_without_fused_bookkeeping(tok, monkeypatch):
    """n = 3 samples of ragged prompts with stop ids, min_tokens (its first steps take the PyTorch
    path) and a look every step, so rows finish at different steps and the batch compacts."""
    from atlas_fast.rollout.engine import sample_kernel

    model = tiny_decoder("qwen2", tok, layers=1).to(DEVICE)
    prompts = [tok(text, add_special_tokens=False)["input_ids"] for text in ["12+3=", "4*5=ab cd", "9", "ab"]]
    stops = [tok.convert_tokens_to_ids(c) for c in "0123456789"]
    calls = []
    real = sample_kernel.sample_tokens_into

    def counted(*args, **kwargs):
        calls.append(kwargs["t"])
        return real(*args, **kwargs)

    monkeypatch.setattr(sample_kernel, "sample_tokens_into", counted)

    def generate(fused_bookkeeping, **params):
        engine = EngineBackend(model, tok, fused_sampler=True, fused_bookkeeping=fused_bookkeeping, check_every=1)
        return engine.generate(prompts, SamplingParams(n=3, temperature=1.0, seed=21, **params))

    compactions = 0
    for params in (dict(max_tokens=10, logprobs=True, stop_token_ids=stops, min_tokens=2),
                   dict(max_tokens=6, logprobs=False, ignore_eos=True)):  # no stop mask at all
        calls.clear()
        fused = generate(True, **params)
        fused_steps = list(calls)
        plain = generate(False, **params)
        assert calls == fused_steps  # nothing fused with the option off
        assert fused_steps and min(fused_steps) == params.get("min_tokens", 0)  # min_tokens steps stay in PyTorch
        assert fused.completion_ids == plain.completion_ids
        assert fused.finish_reasons == plain.finish_reasons
        assert fused.logprobs == plain.logprobs
        assert fused.metrics["engine/decode_steps"] == plain.metrics["engine/decode_steps"]
        compactions += fused.metrics["engine/compactions"]
        if params["logprobs"]:
            assert FINISH_STOP in fused.finish_reasons and FINISH_LENGTH in fused.finish_reasons
            assert all(lp <= 0 for row in fused.logprobs for lp in row)
    assert compactions >= 1


@pytest.mark.parametrize("t", [4, 7])
def test_step_and_seed_read_from_the_device_match_the_host_values(t):
    """The in-graph sampler reads t and the base seed from a device tensor (seed = base + t): the
    draws, records and next inputs equal a launch given t and (base + t) from the host."""
    from atlas_fast.rollout.engine import sample_kernel

    B, N, V, T, pad_id, base = 13, 10, 61, 9, 0, 2**31 - 3  # base + t wraps past 2**31
    inputs = step_inputs(B, N, V, T, torch.float32, seed=5)
    results = []
    for from_device in (False, True):
        logits, finished, rows, positions, out_tokens, out_logps, stop_mask = [x.clone() for x in inputs]
        tokens = torch.full((B,), -1, dtype=torch.long, device=DEVICE)
        step = torch.tensor([t, base], device=DEVICE) if from_device else None
        seed, t_arg = (0, 0) if from_device else ((base + t) % 2**31, t)
        sample_kernel.sample_tokens_into(logits, 0.9, seed, t=t_arg, finished=finished, rows=rows,
                                         out_tokens=out_tokens, out_logps=out_logps, stop_mask=stop_mask,
                                         tokens=tokens, positions=positions, advance=1, pad_id=pad_id, step=step)
        results.append((tokens, finished, positions, out_tokens, out_logps))
        if from_device:
            assert step.tolist() == [t, base]  # read only: advancing it is the caller's
    for host, device in zip(*results):
        assert torch.equal(host, device)
    assert not torch.equal(results[0][3][:, t], inputs[4][:, t])  # column t was written
    with pytest.raises(ValueError, match="step must be an int64"):
        sample_kernel.sample_tokens_into(*inputs[:1], 0.9, 0, t=0, finished=inputs[1], rows=inputs[2],
                                         out_tokens=inputs[4], out_logps=None, stop_mask=None,
                                         tokens=torch.zeros(B, dtype=torch.long, device=DEVICE),
                                         positions=inputs[3], advance=1, pad_id=0,
                                         step=torch.zeros(3, dtype=torch.long, device=DEVICE))


def test_graph_inputs_are_adopted_once_and_copied_only_when_foreign():
    """A replay reads the graphs' input buffers: a batch whose tokens/positions are views of them
    (after `adopt`) is read in place; any other tensor is copied in first."""
    from atlas_fast.rollout.engine.graphs import DecodeGraphs

    graphs = DecodeGraphs(lambda tok, pos, span: None, 8, torch.device("cpu"))
    seen = []

    class Replay:  # stands in for a captured graph: records what the replay would read
        def replay(self):
            seen.append((graphs.tokens[:4].clone(), graphs.positions[:4].clone()))

    graphs.graphs[(4, 16, None)] = (Replay(), "logits")
    tokens, positions, finished, rows = graphs.adopt(torch.tensor([5, 6, 7, 8]), torch.tensor([1, 2, 3, 4]),
                                                     torch.tensor([False, True, False, True]), torch.arange(4))
    assert tokens.data_ptr() == graphs.tokens.data_ptr() and positions.data_ptr() == graphs.positions.data_ptr()
    assert finished.data_ptr() == graphs.finished.data_ptr() and rows.data_ptr() == graphs.rows.data_ptr()
    assert finished.tolist() == [False, True, False, True] and rows.tolist() == [0, 1, 2, 3]
    tokens.copy_(torch.tensor([9, 9, 9, 9]))  # what the fused sampler does after a replay
    positions += 1
    assert graphs(tokens, positions, 16) == "logits"
    assert seen[-1][0].tolist() == [9, 9, 9, 9] and seen[-1][1].tolist() == [2, 3, 4, 5]
    graphs(torch.tensor([1, 2, 3, 0]), positions, 16)  # a new tensor (the PyTorch path) is copied in
    assert seen[-1][0].tolist() == [1, 2, 3, 0] and seen[-1][1].tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="B <= 8"):
        graphs.adopt(*(torch.zeros(9, dtype=torch.long) for _ in range(4)))


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("attention", ["triton", "sdpa"])
def test_cuda_graphs_read_the_fused_samplers_writes(tok, attention):
    """Under CUDA graphs the sampler writes the next replay's inputs in place: the completions must
    be those of the unfused path, which copies its new tensors into the buffers before each replay."""
    model = tiny_decoder("llama", tok).cuda()
    prompts = [tok(text, add_special_tokens=False)["input_ids"] for text in ["12+3=", "4*5=ab cd", "9", "7-2=x<y>?"]]
    stops = [tok.convert_tokens_to_ids(c) for c in "0123456789"]
    params = SamplingParams(max_tokens=40, n=5, temperature=1.0, seed=3, logprobs=True, stop_token_ids=stops)
    outs = {}
    for fused in (True, False):
        engine = EngineBackend(model, tok, dtype=torch.float32, check_every=1, span_step=16, attention=attention,
                               fused_bookkeeping=fused)
        outs[fused] = engine.generate(prompts, params)
        assert engine.graphs is not None and len(engine.graphs) >= 1
    assert outs[True].completion_ids == outs[False].completion_ids
    assert outs[True].finish_reasons == outs[False].finish_reasons
    assert outs[True].logprobs == outs[False].logprobs
    assert outs[True].metrics["engine/compactions"] >= 1


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("min_tokens", [0, 6])
def test_sampler_inside_the_graph_draws_what_the_launched_sampler_draws(tok, min_tokens):
    """graph_sampler captures the sampler into the decode graph: completions, finish reasons and
    log-probs equal those of the sampler launched after each replay, with stops, compaction and
    min_tokens steps (which take the PyTorch sampler outside the graph) in the mix."""
    model = tiny_decoder("llama", tok).cuda()
    prompts = [tok(text, add_special_tokens=False)["input_ids"] for text in ["12+3=", "4*5=ab cd", "9", "7-2=x<y>?"]]
    stops = [tok.convert_tokens_to_ids(c) for c in "0123456789"]
    params = SamplingParams(max_tokens=40, n=5, temperature=1.0, seed=3, logprobs=True, stop_token_ids=stops,
                            min_tokens=min_tokens)
    outs = {}
    for in_graph in (True, False):
        engine = EngineBackend(model, tok, dtype=torch.float32, check_every=1, graph_sampler=in_graph)
        outs[in_graph] = [engine.generate(prompts, params) for _ in range(2)]  # the second call replays
        keys = [key for key in engine.graphs.graphs]
        assert any(key[2] is not None for key in keys) == in_graph
    for a, b in zip(outs[True], outs[False]):
        assert a.completion_ids == b.completion_ids
        assert a.finish_reasons == b.finish_reasons
        assert a.logprobs == b.logprobs
    assert outs[True][0].metrics["engine/compactions"] >= 1
