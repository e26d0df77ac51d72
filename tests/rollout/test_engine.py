"""The engine backend against HF `generate` (the hf backend) on tiny offline models, CPU, fp32.

Greedy decoding must match HF token for token: four families (Llama with a llama3-scaled rope,
Qwen2, Qwen3 with q/k norms, Mistral with a sliding window), ragged prompts, EOS and stop ids,
min_tokens, repetition penalty, n > 1, compaction of finished rows, a LoRA policy, and weights
changed by an optimizer step. The fused Triton decode kernels run through the interpreter here.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from atlas_fast.rollout import FINISH_LENGTH, FINISH_STOP, SamplingParams, build_backend
from atlas_fast.rollout.engine import EngineBackend
from atlas_fast.rollout.engine.sampling import process

from .engine_models import ARCHS, one_thread, tiny_decoder  # noqa: F401 (one_thread: an autouse fixture)

TEXTS = ["12+3=", "4*5=ab cd", "9", "7-2=x<y>?", "ab"]  # ragged: 1 to 9 tokens


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]


@pytest.fixture(scope="module")
def models(tok):
    return {arch: tiny_decoder(arch, tok) for arch in ARCHS}


def hf_greedy(model, tok, prompts, **sampling):
    """HF's greedy completions, one per prompt (the hf backend, n=1)."""
    return build_backend("hf", model, tok).generate(prompts, SamplingParams(temperature=0.0, **sampling))


def repeat(rows, n):
    return [r for r in rows for _ in range(n)]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf(models, tok, prompts, arch):
    model = models[arch]
    ref = hf_greedy(model, tok, prompts, max_tokens=20)
    engine = EngineBackend(model, tok)
    out = engine.generate(prompts, SamplingParams(max_tokens=20, n=2, temperature=0.0))
    assert out.completion_ids == repeat(ref.completion_ids, 2)
    assert out.finish_reasons == repeat(ref.finish_reasons, 2)
    assert len({tuple(c) for c in ref.completion_ids}) > 2  # the model does branch: the comparison means something


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need the Triton interpreter")
@pytest.mark.parametrize("arch", ["qwen3", "mistral", "qwen2"])
@pytest.mark.parametrize("head_dim", [16, 32])
def test_fused_decode_kernels_match_hf(models, tok, prompts, arch, head_dim, monkeypatch):
    """The CUDA decode step's Triton kernels (norms, rotary + KV write, attention, SiLU) and packed
    projections, run by the interpreter (Qwen3: per-head q/k norms; Mistral: sliding window;
    Qwen2: q/k/v biases in the packed projection). head_dim 32 takes the skinny GEMMs (skinny.py),
    whose rotary halves need 16 columns, with o_proj and down_proj split-K (their partials summed by
    the next norm); 16 takes cuBLAS + the separate norm/rotary kernels."""
    from atlas_fast.rollout.engine import skinny

    model = models[arch] if head_dim == 16 else tiny_decoder(arch, tok, heads=(2, 1))
    monkeypatch.setattr(skinny, "DOWN_SPLIT", 3 if head_dim == 32 else 0)
    monkeypatch.setattr(skinny, "O_SPLIT", 2 if head_dim == 32 else 0)
    # K-blocks of 16 so that K = 64 (o_proj) and 96 (down_proj) really cut into 2 and 3 slices.
    monkeypatch.setattr(skinny, "O_CONFIG", (16, 16, 4, 2))
    monkeypatch.setattr(skinny, "DOWN_CONFIG", (16, 16, 4, 2))
    split_weights = []
    real_linear = skinny.linear

    def linear(x, weight, bias=None, config=None, split_k=1):
        out = real_linear(x, weight, bias, config, split_k)
        if split_k > 1 and out.dim() == 3:  # float32 partials [split, B, N], summed by the next norm
            split_weights.append(weight.shape)
        return out

    monkeypatch.setattr(skinny, "linear", linear)
    ref = hf_greedy(model, tok, prompts, max_tokens=6)
    engine = EngineBackend(model, tok, fused_kernels=True)
    out = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0))
    assert engine._step_fn().__name__ == "decode_logits_fused+triton_attention"
    assert engine.packed is not None
    assert all(layer.qkv is not None and layer.gate_up is not None for layer in engine.packed.layers)
    layer = model.model.layers[0]
    expected = {layer.self_attn.o_proj.weight.shape, layer.mlp.down_proj.weight.shape} if head_dim == 32 else set()
    assert set(split_weights) == expected
    assert out.completion_ids == ref.completion_ids


def first_occurrence_stops(ref_rows, at=(3, 6, 9)):
    """Stop ids that end HF's greedy rows at different steps (so rows finish at different times)."""
    stops = []
    for row, k in zip(ref_rows, at):
        if len(row) > k:
            stops.append(row[k])
    return tuple(sorted(set(stops)))


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_stop_ids_min_tokens_and_compaction(models, tok, prompts, arch):
    model = models[arch]
    plain = hf_greedy(model, tok, prompts, max_tokens=24)
    stops = first_occurrence_stops(plain.completion_ids)
    assert stops
    engine = EngineBackend(model, tok, check_every=1)  # look every step so compaction happens early
    compactions = 0
    for min_tokens in (0, 8):
        ref = hf_greedy(model, tok, prompts, max_tokens=24, stop_token_ids=stops, min_tokens=min_tokens)
        out = engine.generate(prompts, SamplingParams(max_tokens=24, n=3, temperature=0.0, stop_token_ids=stops,
                                                      min_tokens=min_tokens))
        assert out.completion_ids == repeat(ref.completion_ids, 3)
        assert out.finish_reasons == repeat(ref.finish_reasons, 3)
        assert FINISH_STOP in out.finish_reasons
        for ids, reason in zip(out.completion_ids, out.finish_reasons):
            if reason == FINISH_STOP:
                assert ids[-1] in stops + (tok.eos_token_id,) and len(ids) > min_tokens
                assert not set(ids[:-1]) & set(stops) or min_tokens  # cut at the first stop after min_tokens
        compactions += out.metrics["engine/compactions"]
    assert compactions >= 1  # 15 rows (bucket 16) shrank as rows stopped


def test_eos_stops_and_ignore_eos(models, tok, prompts):
    model = models["llama"]  # its greedy rows hit EOS within 20 tokens for some prompts
    ref = hf_greedy(model, tok, prompts, max_tokens=20)
    assert FINISH_STOP in ref.finish_reasons and FINISH_LENGTH in ref.finish_reasons
    engine = EngineBackend(model, tok)
    out = engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0.0))
    assert out.completion_ids == ref.completion_ids
    for ids, reason in zip(out.completion_ids, out.finish_reasons):
        assert (ids[-1] == tok.eos_token_id) == (reason == FINISH_STOP)
    fixed = engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    assert all(len(ids) == 20 for ids in fixed.completion_ids)
    assert set(fixed.finish_reasons) == {FINISH_LENGTH}
    for short, long in zip(out.completion_ids, fixed.completion_ids):
        assert long[: len(short)] == short  # same greedy path until the EOS that is now ignored


def test_ignore_eos_keeps_explicit_stop_ids_on_both_backends(models, tok, prompts):
    """vLLM's meaning of ignore_eos: the model's EOS ids stop nothing, an explicit stop id still does."""
    model = models["llama"]
    engine = EngineBackend(model, tok)
    fixed = engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    stop = fixed.completion_ids[0][5]
    sampling = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=(stop,))
    out = engine.generate(prompts, sampling)
    assert out.completion_ids == build_backend("hf", model, tok).generate(prompts, sampling).completion_ids
    for full, ids, reason in zip(fixed.completion_ids, out.completion_ids, out.finish_reasons):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert ids == full[:cut] and reason == (FINISH_STOP if stop in full else FINISH_LENGTH)


def test_stop_ids_outside_the_vocabulary_are_named(models, tok, prompts):
    with pytest.raises(ValueError, match="stop_token_ids must be token ids"):
        SamplingParams(max_tokens=4, stop_token_ids=(-3,))
    model = models["llama"]
    sampling = SamplingParams(max_tokens=4, stop_token_ids=(model.config.vocab_size,))
    for backend in (EngineBackend(model, tok), build_backend("hf", model, tok)):
        with pytest.raises(ValueError, match="outside the model's vocabulary"):
            backend.generate(prompts, sampling)


def test_repetition_penalty_matches_hf(models, tok, prompts):
    model = models["qwen3"]
    ref = hf_greedy(model, tok, prompts, max_tokens=16, repetition_penalty=1.5)
    out = EngineBackend(model, tok).generate(prompts, SamplingParams(max_tokens=16, temperature=0.0,
                                                                     repetition_penalty=1.5))
    assert out.completion_ids == ref.completion_ids
    assert ref.completion_ids != hf_greedy(model, tok, prompts, max_tokens=16).completion_ids  # it mattered


def test_logprobs_are_those_of_the_processed_distribution(models, tok, prompts):
    """Each returned log-prob equals log softmax(processed logits) from an independent full forward."""
    model = models["qwen2"]
    params = SamplingParams(max_tokens=10, n=2, temperature=0.7, top_k=20, top_p=0.9, logprobs=True, seed=3)
    out = EngineBackend(model, tok).generate(prompts, params)
    for row, (ids, lps) in enumerate(zip(out.completion_ids, out.logprobs)):
        prompt = prompts[row // 2]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]  # [C, V]
        for t, (token, lp) in enumerate(zip(ids, lps)):
            want = process(logits[t : t + 1], params, t).log_softmax(-1)[0, token].item()
            assert lp <= 0 and math.isfinite(lp)
            assert lp == pytest.approx(want, abs=1e-4)
    greedy = EngineBackend(model, tok).generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, logprobs=True))
    ref = build_backend("hf", model, tok).generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, logprobs=True))
    for a, b in zip(greedy.logprobs, ref.logprobs):
        assert a == pytest.approx(b, abs=1e-4)


def test_seeded_sampling_is_deterministic_and_grouped(models, tok, prompts):
    model = models["mistral"]
    engine = EngineBackend(model, tok)
    params = SamplingParams(max_tokens=12, n=4, temperature=1.0, seed=7)
    a, b = engine.generate(prompts, params), engine.generate(prompts, params)
    assert a.completion_ids == b.completion_ids
    assert a.completion_ids != engine.generate(prompts, SamplingParams(max_tokens=12, n=4, seed=8)).completion_ids
    assert len({tuple(c) for c in a.completion_ids[:4]}) > 1  # the n samples of one prompt differ
    # top_k=1 is greedy whatever the temperature: rows i*n .. i*n+n-1 all continue prompt i.
    ref = hf_greedy(model, tok, prompts, max_tokens=12)
    top1 = engine.generate(prompts, SamplingParams(max_tokens=12, n=3, temperature=1.3, top_k=1, seed=0))
    assert top1.completion_ids == repeat(ref.completion_ids, 3)


def test_first_token_distribution_end_to_end(models, tok):
    """3000 samples of one prompt's first token (prefill fanned out to 3000 rows) follow softmax(logits / T)."""
    model = models["qwen3"]
    prompt = tok("3+4=", add_special_tokens=False)["input_ids"]
    T = 1.5
    out = EngineBackend(model, tok).generate([prompt], SamplingParams(max_tokens=1, n=3000, temperature=T, seed=0))
    with torch.no_grad():
        probs = (model(torch.tensor([prompt])).logits[0, -1].double() / T).softmax(-1)
    counts = torch.bincount(torch.tensor([ids[0] for ids in out.completion_ids]), minlength=probs.numel()).double()
    expected = probs * counts.sum()
    keep = expected >= 5  # chi-square needs expected counts of 5 or more; pool the rest
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    stat = ((obs - exp) ** 2 / exp).sum()
    p = torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2, dtype=torch.float64), stat / 2).item()
    assert p > 1e-3, f"chi-square p = {p:.2e}"


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_lora_policy(tok, prompts, fused):
    if fused and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors need the Triton interpreter")
    peft = pytest.importorskip("peft")
    base = tiny_decoder("qwen2", tok, seed=1)
    # init_lora_weights=False: random A and B, so the adapter changes the outputs from the start.
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"],
                                                      init_lora_weights=False, lora_dropout=0.1))
    model.train()  # as the trainer holds it: the engine must sample without dropout and restore the mode
    n_new = 6 if fused else 16  # the interpreter runs each Triton program in Python
    ref = hf_greedy(model, tok, prompts, max_tokens=n_new)
    with model.disable_adapter():
        plain = hf_greedy(model, tok, prompts, max_tokens=n_new)
    assert ref.completion_ids != plain.completion_ids
    engine = build_backend("engine", model, tok, fused_kernels=fused)
    out = engine.generate(prompts, SamplingParams(max_tokens=n_new, temperature=0.0))
    assert out.completion_ids == ref.completion_ids
    assert model.training
    if fused:  # q/k/v and gate/up hold LoRA layers here: called as modules, never packed
        assert all(layer.qkv is None and layer.gate_up is None for layer in engine.packed.layers)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused-packed"])
def test_samples_from_updated_weights_after_optimizer_step(tok, prompts, fused):
    if fused and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors need the Triton interpreter")
    model = tiny_decoder("llama", tok, seed=2)
    engine = build_backend("engine", model, tok, fused_kernels=fused)
    n_new = 5 if fused else 12  # the interpreter runs each Triton program in Python
    greedy = SamplingParams(max_tokens=n_new, temperature=0.0)
    before = engine.generate(prompts[:3], greedy).completion_ids
    # One step that makes the model prefer the digit "7" after every prompt.
    target = tok.convert_tokens_to_ids("7")
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    batch = [torch.tensor(p) for p in prompts]
    loss = sum(-model(p[None]).logits[0, -1].log_softmax(-1)[target] for p in batch)
    loss.backward()
    opt.step()
    if not fused:
        engine.update_weights(model)  # free: the engine reads the parameters in place
    # (fused: no update_weights call at all; the packed copies notice the new versions by themselves)
    after = engine.generate(prompts[:3], greedy)
    assert after.completion_ids != before
    assert after.completion_ids == hf_greedy(model, tok, prompts[:3], max_tokens=n_new).completion_ids
    # A write through `.data` (as an offloaded optimizer uploads weights) moves no version counter:
    # update_weights is what the trainer calls after every step, and it must be enough.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.data.copy_(layer.mlp.up_proj.weight.data.flip(0))
            layer.self_attn.k_proj.weight.data.mul_(-1.0)
    engine.update_weights(model)
    flipped = engine.generate(prompts[:3], greedy)
    assert flipped.completion_ids == hf_greedy(model, tok, prompts[:3], max_tokens=n_new).completion_ids
    assert flipped.completion_ids != after.completion_ids


def test_refuses_unsupported_architectures_and_bad_prompts(tok, models):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(NotImplementedError, match="gpt2.*rollout_backend='hf'"):
        build_backend("engine", gpt2, tok)
    engine = EngineBackend(models["qwen2"], tok)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[3, 4], []], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[3, len(tok) + 5]], SamplingParams(max_tokens=2))
    assert engine.generate([], SamplingParams(max_tokens=2)).completion_ids == []


def test_cache_is_reused_and_grows(models, tok, prompts):
    engine = EngineBackend(models["qwen2"], tok)
    engine.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0))
    cache = engine.cache
    engine.generate(prompts[:1], SamplingParams(max_tokens=3, temperature=0.0))
    assert engine.cache is cache  # a smaller call reuses the buffer
    out = engine.generate(prompts, SamplingParams(max_tokens=40, n=4, temperature=0.0))
    assert engine.cache.rows >= 20 and engine.cache.length >= 49
    assert out.completion_ids == repeat(hf_greedy(models["qwen2"], tok, prompts, max_tokens=40).completion_ids, 4)


def test_trainer_trains_with_the_engine_backend(tmp_path, tok):
    from atlas_fast import GRPOConfig, GRPOTrainer
    from tiny import arithmetic_rows, tiny_model

    config = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=2, num_generations=4, per_device_train_batch_size=8,
                        max_completion_length=6, learning_rate=1e-2, lr_scheduler_type="constant", seed=0,
                        use_kernels=False, disable_tqdm=True, rollout_backend="engine", temperature=0.9)
    digits = set(tok.convert_tokens_to_ids(list("0123456789")))

    def digit_reward(completion_ids, **kwargs):
        return [sum(t in digits for t in ids) / max(len(ids), 1) for ids in completion_ids]

    model = tiny_model(tok)
    trainer = GRPOTrainer(config, model=model, tokenizer=tok, train_dataset=arithmetic_rows(16), reward_funcs=digit_reward)
    assert isinstance(trainer.rollout, EngineBackend)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    # The engine sampled from the trained weights: its greedy output is HF's on the updated model.
    prompts = [tok("3+4=", add_special_tokens=False)["input_ids"]]
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    assert trainer.rollout.generate(prompts, greedy).completion_ids == hf_greedy(model, tok, prompts, max_tokens=6).completion_ids
