"""The engine's CUDA path (CUDA graphs, fused Triton decode kernels, compaction) against HF greedy,
in float32 on the GPU. Skipped without CUDA; on a GPU machine run with TRITON_INTERPRET=0."""
from __future__ import annotations

import pytest
import torch

from atlas_fast.rollout import FINISH_STOP, SamplingParams
from atlas_fast.rollout.engine import EngineBackend

from .engine_models import ARCHS, tiny_decoder
from .test_engine import first_occurrence_stops, hf_greedy, prompts, repeat  # noqa: F401 (prompts: a fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("attention", ["triton", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_graphs_and_fused_kernels_match_hf_greedy(tok, prompts, arch, attention):
    model = tiny_decoder(arch, tok).cuda()
    engine = EngineBackend(model, tok, dtype=torch.float32, check_every=1, span_step=16, attention=attention)
    assert engine._compute_dtype() == torch.float32
    ref = hf_greedy(model, tok, prompts, max_tokens=40)
    out = engine.generate(prompts, SamplingParams(max_tokens=40, n=3, temperature=0.0))
    assert engine.graphs is not None and len(engine.graphs) >= (1 if attention == "triton" else 2)  # sdpa: per span
    assert engine._step_fn().__name__.startswith("decode_logits_fused")
    assert out.completion_ids == repeat(ref.completion_ids, 3)
    stops = first_occurrence_stops(ref.completion_ids)
    ref = hf_greedy(model, tok, prompts, max_tokens=40, stop_token_ids=stops)
    out = engine.generate(prompts, SamplingParams(max_tokens=40, n=3, temperature=0.0, stop_token_ids=stops))
    assert out.completion_ids == repeat(ref.completion_ids, 3)
    assert FINISH_STOP in out.finish_reasons and out.metrics["engine/compactions"] >= 1
    assert len(engine.graphs) >= 2  # the smaller buckets the finished rows left behind


def test_bf16_autocast_sampling_runs_and_updates(tok, prompts):
    model = tiny_decoder("qwen3", tok).cuda()  # float32 weights: the engine decodes under bf16 autocast
    engine = EngineBackend(model, tok)
    params = SamplingParams(max_tokens=30, n=8, temperature=1.0, top_p=0.9, logprobs=True, seed=0)
    out = engine.generate(prompts, params)
    assert len(out.completion_ids) == 40
    assert all(lp <= 0 for row in out.logprobs for lp in row)
    assert engine.generate(prompts, params).completion_ids == out.completion_ids  # seeded
    plain = SamplingParams(max_tokens=30, n=8, temperature=0.8, logprobs=True, seed=1)  # the one-pass Triton sampler
    a, b = engine.generate(prompts, plain), engine.generate(prompts, plain)
    assert a.completion_ids == b.completion_ids and all(lp <= 0 for row in a.logprobs for lp in row)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.0)  # in place, as an optimizer step: the captured graphs must see it
    engine.update_weights(model)
    greedy = SamplingParams(max_tokens=20, temperature=0.0)
    flipped = engine.generate(prompts, greedy).completion_ids
    fresh = EngineBackend(model, tok).generate(prompts, greedy).completion_ids  # graphs captured after the change
    assert flipped == fresh
