"""The hf backend: n completions per prompt, grouped, greedy or sampled, cut at the first stop."""
import pytest
import torch

from atlas_fast.rollout import FINISH_LENGTH, FINISH_STOP, SamplingParams, build_backend
from tests.tiny import char_tokenizer, tiny_model


def _backend():
    tok = char_tokenizer()
    model = tiny_model(tok, seed=3).eval()
    return build_backend("hf", model, tok), tok


def test_greedy_with_n_repeats_each_prompts_greedy_completion():
    backend, tok = _backend()
    prompts = [tok("1+2=", add_special_tokens=False)["input_ids"], tok("34+5=", add_special_tokens=False)["input_ids"]]
    one = backend.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0))
    three = backend.generate(prompts, SamplingParams(max_tokens=8, n=3, temperature=0.0))
    assert three.completion_ids == [ids for ids in one.completion_ids for _ in range(3)]
    assert len(three.finish_reasons) == 6


def test_sampled_groups_are_contiguous_and_reasons_match_the_stop():
    backend, tok = _backend()
    eos = tok.eos_token_id
    prompts = [tok("7+7=", add_special_tokens=False)["input_ids"]] * 2
    torch.manual_seed(0)
    out = backend.generate(prompts, SamplingParams(max_tokens=6, n=4, temperature=1.0, logprobs=True))
    assert len(out.completion_ids) == 8
    for ids, reason, lps in zip(out.completion_ids, out.finish_reasons, out.logprobs):
        assert reason == (FINISH_STOP if ids and ids[-1] == eos else FINISH_LENGTH)
        assert eos not in ids[:-1]
        assert len(lps) == len(ids) and all(lp <= 0 for lp in lps)


def test_auto_backend_is_generate_without_a_gpu_and_named_backends_pass_through(monkeypatch):
    from atlas_fast.rollout import resolve_backend
    from atlas_fast.rollout.hf import HFBackend

    tok = char_tokenizer()
    model = tiny_model(tok)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend("auto", model) == "hf"
    assert isinstance(build_backend("auto", model, tok), HFBackend)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_backend("auto", model) == "engine"  # a Qwen2 model: the engine knows it
    assert resolve_backend("hf", model) == "hf"
    model.config.model_type = "gpt_neox"
    assert resolve_backend("auto", model) == "hf"  # an architecture the engine does not know


def test_a_seeded_call_in_chunks_draws_fresh_samples_per_chunk():
    from atlas_fast.rollout.hf import HFBackend

    tok = char_tokenizer()
    model = tiny_model(tok, seed=3).eval()
    prompt = tok("7+7=", add_special_tokens=False)["input_ids"]
    sampling = SamplingParams(max_tokens=8, temperature=1.0, seed=5)
    chunked = HFBackend(model, tok, batch_size=1).generate([prompt] * 4, sampling)
    assert len(set(map(tuple, chunked.completion_ids))) > 1  # not one chunk's draws four times
    assert HFBackend(model, tok, batch_size=1).generate([prompt] * 4, sampling).completion_ids == chunked.completion_ids


def test_a_row_that_runs_to_its_length_keeps_a_sampled_pad_token():
    # A head of zeros ties every logit, so greedy decoding picks id 0, the pad id, at every step: a
    # row of sampled pad tokens that runs to its length. generate pads only rows that stopped.
    backend, tok = _backend()
    with torch.no_grad():
        backend.model.get_output_embeddings().weight.zero_()
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("12+3=", "ab")]
    out = backend.generate(prompts, SamplingParams(max_tokens=5, temperature=0.0, logprobs=True))
    assert out.completion_ids == [[tok.pad_token_id] * 5] * 2
    assert out.finish_reasons == [FINISH_LENGTH] * 2 and all(len(lp) == 5 for lp in out.logprobs)


def test_temperatures_below_vllms_epsilon_decode_greedily():
    from atlas_fast.rollout.engine import EngineBackend

    hf, tok = _backend()
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("12+3=", "ab")]
    for backend in (hf, EngineBackend(hf.model, tok)):
        greedy = backend.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, logprobs=True))
        for t in (1e-7, 1e-44):  # 1e-44: logits / t overflow float32
            tiny = backend.generate(prompts, SamplingParams(max_tokens=6, temperature=t, logprobs=True))
            assert tiny.completion_ids == greedy.completion_ids
            assert all(torch.isfinite(torch.tensor(lp)).all() for lp in tiny.logprobs)


def test_sampled_log_probs_are_the_engines_processed_distribution():
    # min_p with top_p: vLLM's order (min_p first), which the engine follows and transformers' own
    # warpers do not; the log-probs hf reports come from the same processed logits.
    from atlas_fast.rollout.engine.sampling import process

    backend, tok = _backend()
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("12+3=", "4*5=ab cd", "9", "ab")]
    params = SamplingParams(max_tokens=1, n=8, temperature=0.5, top_p=0.6, min_p=0.3, logprobs=True, seed=0)
    out = backend.generate(prompts, params)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            logits = backend.model(torch.tensor([prompt])).logits[0, -1:].float()
            want = process(logits, params, step=0).log_softmax(-1)[0]
            for ids, lp in zip(out.completion_ids[i * 8:(i + 1) * 8], out.logprobs[i * 8:(i + 1) * 8]):
                assert torch.isfinite(want[ids[0]])  # a token the filters keep
                assert lp[0] == pytest.approx(want[ids[0]].item(), abs=1e-5)
