"""GRPOTrainer end to end on CPU with tiny offline models (tests/tiny.py).

Most runs use `use_kernels=False` (atlas_kernels.reference): under TRITON_INTERPRET=1 every
Triton program is interpreted in Python, ~0.7 s per step at these shapes against ~0.1 s for
the reference path. The kernels path is exercised by the convergence test. Completions come from a
fixed `rollout_func` wherever a test needs them identical across runs; resume tests sample with
`generate` on purpose, so that restoring the RNG state is part of what they check.
"""
from __future__ import annotations

import json
import math
import sys
import warnings

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from atlas_fast import EvalPrediction, GRPOConfig, GRPOTrainer
from atlas_fast import checkpoint as ckpt
from atlas_fast.checkpoint import load_checkpoint
from atlas_fast.metrics import read_metrics
from tiny import arithmetic_rows, char_tokenizer, tiny_model

G = 4  # completions per prompt in every run below


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These matmuls are ~[16, 12, 32] x [32, 64]: a second intra-op thread only adds
    # synchronisation (1,000 such linears: 0.08 s on one thread, 18 s on two while other
    # test processes shared the 2 cores).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tok():
    return char_tokenizer()


# ---------------------------------------------------------------------- helpers
def digit_text_reward(completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


DIGIT_IDS = frozenset(char_tokenizer().convert_tokens_to_ids(list("0123456789")))


def digit_reward(completion_ids, **kwargs):
    """Fraction of completion tokens that are digits: dense enough to learn in a dozen steps."""
    return [sum(t in DIGIT_IDS for t in ids) / max(len(ids), 1) for ids in completion_ids]


def fixed_rollout(prompts, trainer, vary_groups=True):
    """Deterministic completions: member k of a group is "12ab34cd"[: 1 + k + shift], plus EOS when k
    is even, so digit rewards, lengths and finished/truncated differ inside each group. With
    `vary_groups`, `shift` (0-2) depends on the prompt, so groups differ in token counts too."""
    out = []
    for i, prompt in enumerate(prompts):
        k = i % trainer.args.num_generations
        shift = sum(map(ord, str(prompt))) % 3 if vary_groups else 0
        ids = trainer.tokenizer("12ab34cd"[: 1 + k + shift], add_special_tokens=False)["input_ids"]
        if k % 2 == 0:
            ids = ids + [trainer.tokenizer.eos_token_id]
        out.append(ids)
    return out


def same_groups_rollout(prompts, trainer):
    return fixed_rollout(prompts, trainer, vary_groups=False)


def config(tmp_path, name="run", **overrides) -> GRPOConfig:
    values = dict(
        output_dir=str(tmp_path / name), max_steps=2, num_generations=G, per_device_train_batch_size=8,
        max_completion_length=6, learning_rate=1e-2, lr_scheduler_type="constant", seed=0,
        use_kernels=False, disable_tqdm=True,
    )
    values.update(overrides)
    return GRPOConfig(**values)


def trainer_for(tmp_path, tok, *, name="run", rows=None, model=None, reward_funcs=digit_reward, cls=GRPOTrainer,
                trainer_kwargs=None, **overrides) -> GRPOTrainer:
    return cls(
        config(tmp_path, name, **overrides), model=model if model is not None else tiny_model(tok), tokenizer=tok,
        train_dataset=rows if rows is not None else arithmetic_rows(16), reward_funcs=reward_funcs,
        **(trainer_kwargs or {}),
    )


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_records(output_dir) -> list[dict]:
    return [r for r in read_metrics(output_dir / "metrics.jsonl") if "reward" in r]


class StopAt(TrainerCallback):
    def __init__(self, step: int, how: str = "set"):
        self.step, self.how = step, how

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
            if self.how == "return":  # the other transformers idiom
                return control


# ---------------------------------------------------------------------- 1. learning
@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "reference"])
def test_reward_rises(tmp_path, tok, use_kernels):
    steps = 12
    trainer = trainer_for(tmp_path, tok, rows=arithmetic_rows(32), max_steps=steps, learning_rate=3e-2,
                          max_completion_length=4, use_kernels=use_kernels)
    trainer.train()
    rewards = [r["reward"] for r in train_records(tmp_path / "run")]
    assert len(rewards) == steps
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.3, rewards
    assert all(math.isfinite(r["loss"]) for r in train_records(tmp_path / "run"))


# ---------------------------------------------------------------------- 2. callbacks and hooks
class Recorder(TrainerCallback):
    def __init__(self):
        self.events = []

    def __getattribute__(self, name):
        if name.startswith("on_"):
            return lambda args, state, control, **kw: object.__getattribute__(self, "events").append(name)
        return object.__getattribute__(self, name)


def test_callbacks_fire_in_hf_order(tmp_path, tok):
    recorder = Recorder()
    # Two prompts per generation batch and two rows: every step is one whole epoch.
    trainer = trainer_for(tmp_path, tok, rows=arithmetic_rows(2), max_steps=2, eval_strategy="steps", eval_steps=1, save_steps=1,
                          trainer_kwargs=dict(eval_dataset=arithmetic_rows(2, seed=1), callbacks=[recorder],
                                              rollout_func=fixed_rollout))
    trainer.train()
    step = ["on_epoch_begin", "on_step_begin", "on_step_end",
            "on_log",  # the step's metrics
            "on_log", "on_evaluate",  # evaluate() logs, then reports
            "on_save", "on_epoch_end"]
    assert recorder.events == ["on_train_begin", *step, *step, "on_train_end"]


def test_num_train_epochs_sets_the_length_of_the_run(tmp_path, tok):
    recorder = Recorder()
    # 4 rows, 2 prompts per step: 2 steps per epoch, 4 steps for 2 epochs.
    trainer = trainer_for(tmp_path, tok, rows=arithmetic_rows(4), max_steps=-1, num_train_epochs=2,
                          trainer_kwargs=dict(callbacks=[recorder], rollout_func=fixed_rollout))
    state = trainer.train()
    assert state.global_step == 4 and state.epoch == pytest.approx(2.0)
    epoch_events = [e for e in recorder.events if "epoch" in e or e == "on_step_end"]
    assert epoch_events == ["on_epoch_begin", "on_step_end", "on_step_end", "on_epoch_end"] * 2


@pytest.mark.parametrize("how", ["set", "return"])
def test_should_training_stop_ends_training_after_that_step(tmp_path, tok, how):
    trainer = trainer_for(tmp_path, tok, max_steps=5, trainer_kwargs=dict(callbacks=[StopAt(2, how)],
                                                                          rollout_func=fixed_rollout))
    state = trainer.train()
    assert state.global_step == 2
    assert [r["step"] for r in train_records(tmp_path / "run")] == [1, 2]
    # As in transformers, a new train() call starts with the flag cleared and carries on.
    trainer.callbacks = []
    assert trainer.train().global_step == 5


class HookedTrainer(GRPOTrainer):
    """ATLAS's documented override pattern."""

    def __init__(self, *args, **kwargs):
        self.hook_calls = []
        super().__init__(*args, **kwargs)

    def on_epoch_begin(self):
        self.hook_calls.append(("epoch_begin", self.state.global_step))

    def on_step_end(self, args, state, control, **kwargs):
        self.hook_calls.append(("step_end", state.global_step, sorted(kwargs["metrics"])))
        self.log({
            "rewards/mean": self.current_rewards.mean(),
            "kl_divergence": self.current_kl.mean(),
        })

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.hook_calls.append(("evaluate", state.global_step, dict(metrics)))


def test_overridable_hooks_and_log_from_on_step_end(tmp_path, tok):
    # 4 rows, 2 prompts per step: epochs begin at steps 1 and 3.
    trainer = trainer_for(tmp_path, tok, cls=HookedTrainer, rows=arithmetic_rows(4), max_steps=3, beta=0.1,
                          eval_strategy="steps", eval_steps=3, trainer_kwargs=dict(eval_dataset=arithmetic_rows(2, seed=1),
                                                            rollout_func=fixed_rollout))
    trainer.train()
    calls = trainer.hook_calls
    assert [c[:2] for c in calls if c[0] == "epoch_begin"] == [("epoch_begin", 0), ("epoch_begin", 2)]
    assert [c[1] for c in calls if c[0] == "step_end"] == [1, 2, 3]
    assert all("loss" in c[2] and "reward" in c[2] for c in calls if c[0] == "step_end")
    (evaluated,) = [c for c in calls if c[0] == "evaluate"]
    assert evaluated[1] == 3 and "eval/reward" in evaluated[2]

    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    custom = [r for r in records if "rewards/mean" in r]
    train = {r["step"]: r for r in train_records(tmp_path / "run")}
    assert [r["step"] for r in custom] == [1, 2, 3]
    for r in custom:
        assert r["rewards/mean"] == pytest.approx(train[r["step"]]["reward"], abs=1e-6)
        assert r["kl_divergence"] == pytest.approx(train[r["step"]]["kl"], abs=1e-6)
    assert train[3]["kl"] > 0  # the policy has moved away from the reference by step 3
    assert any("rewards/mean" in r for r in trainer.state.log_history)


# ---------------------------------------------------------------------- 3. evaluation
def test_numpy_and_tensor_metrics_keep_checkpoints_resumable(tmp_path, tok):
    import itertools

    import numpy as np
    from datasets import IterableDataset

    def compute_metrics(pred):
        return {"acc": np.mean([1.0, 0.0]), "per_row": torch.tensor([0.5, 0.7])}

    def endless():  # a stream that may never end: eval_max_samples is where reading must stop
        for i in itertools.count():
            assert i < 16, "evaluation read past eval_max_samples"
            yield {**arithmetic_rows(1, seed=i)[0]}

    trainer = trainer_for(tmp_path, tok, max_steps=1, eval_strategy="steps", eval_steps=1, save_steps=1,
                          eval_max_samples=2, trainer_kwargs=dict(rollout_func=fixed_rollout, compute_metrics=compute_metrics,
                                                                  eval_dataset=IterableDataset.from_generator(endless)))
    trainer.train()
    logged = [r for r in trainer.state.log_history if "eval/acc" in r]
    assert logged and logged[0]["eval/acc"] == 0.5 and logged[0]["eval/per_row"] == pytest.approx([0.5, 0.7])
    resumed = trainer_for(tmp_path, tok, max_steps=2, eval_strategy="steps", eval_steps=1, save_steps=1,
                          eval_max_samples=2, trainer_kwargs=dict(rollout_func=fixed_rollout, compute_metrics=compute_metrics,
                                                                  eval_dataset=IterableDataset.from_generator(endless)))
    assert resumed.train(resume_from_checkpoint=True).global_step == 2


def test_evaluate_with_compute_metrics(tmp_path, tok):
    eval_rows = [{**r, "idx": i} for i, r in enumerate(arithmetic_rows(5, seed=3))]
    seen = []

    def compute_metrics(pred: EvalPrediction):
        seen.append(pred)
        return {"n": len(pred.completions), "max_reward": max(pred.rewards["digit_text_reward"])}

    trainer = trainer_for(tmp_path, tok, eval_max_samples=4, per_device_eval_batch_size=3,
                          reward_funcs=digit_text_reward,
                          trainer_kwargs=dict(eval_dataset=eval_rows, compute_metrics=compute_metrics))
    metrics = trainer.evaluate()
    assert all(k.startswith("eval/") for k in metrics), metrics
    assert metrics["eval/n"] == 4  # eval_max_samples
    assert {"eval/reward", "eval/rewards/digit_text_reward/mean", "eval/max_reward", "eval/completions/mean_length"} <= set(metrics)

    (pred,) = seen
    assert pred.prompts == [r["prompt"] for r in eval_rows[:4]]
    assert pred.columns["ground_truth"] == [r["ground_truth"] for r in eval_rows[:4]]
    assert pred.columns["idx"] == [0, 1, 2, 3]
    assert list(pred.rewards) == ["digit_text_reward"]
    assert pred.rewards["digit_text_reward"] == pytest.approx(digit_text_reward(pred.completions))
    assert metrics["eval/reward"] == pytest.approx(sum(pred.rewards["digit_text_reward"]) / 4, abs=1e-6)

    # Greedy: a second evaluation of the same weights gives the same completions and numbers.
    assert trainer.evaluate() == metrics
    assert seen[1].completions == pred.completions
    logged = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/reward" in r]
    assert len(logged) == 2

    # A dataset passed to evaluate() replaces the trainer's.
    assert trainer.evaluate(arithmetic_rows(2, seed=9))["eval/n"] == 2


def test_evaluate_without_eval_dataset_is_a_clear_error(tmp_path, tok):
    with pytest.raises(ValueError, match="eval_dataset"):
        trainer_for(tmp_path, tok).evaluate()


# ---------------------------------------------------------------------- 4. resume exactness
RESUME_CASES = {
    "plain": (dict(), 2),
    "num_iterations=2": (dict(num_iterations=2), 1),  # stops between the two passes
    "steps_per_generation=4": (dict(steps_per_generation=4), 2),  # 2 of 4 micro-batches pending
    "beta": (dict(beta=0.1), 2),
    "beta+sync_ref_model": (dict(beta=0.1, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5), 2),
    "lora+beta": (dict(beta=0.1, lora=True), 2),  # adapter-only checkpoint
}


def lora_config():
    peft = pytest.importorskip("peft")
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                           task_type="CAUSAL_LM")


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_is_exact(tmp_path, tok, case):
    overrides, stop = RESUME_CASES[case]
    overrides = dict(max_steps=4, max_completion_length=4, temperature=1.5, learning_rate=3e-2, **overrides)
    extra = dict(peft_config=lora_config()) if overrides.pop("lora", False) else {}

    straight = trainer_for(tmp_path, tok, name="straight", trainer_kwargs=extra, **overrides)
    straight.train()

    first = trainer_for(tmp_path, tok, name="resumed", save_steps=stop,
                        trainer_kwargs=dict(callbacks=[StopAt(stop)], **extra), **overrides)
    first.train()
    assert first.state.global_step == stop
    checkpoint = tmp_path / "resumed" / f"checkpoint-{stop}"
    saved = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    if case in ("num_iterations=2", "steps_per_generation=4"):
        assert len(saved["pending"]) > 0  # the resumed run must train on these, not regenerate

    second = trainer_for(tmp_path, tok, name="resumed", save_steps=stop, trainer_kwargs=extra, **overrides)
    second.train(resume_from_checkpoint=str(checkpoint) if case != "plain" else True)  # True: the latest
    assert second.state.global_step == 4

    expected, got = params(straight.model), params(second.model)
    assert expected.keys() == got.keys()
    initial = params(trainer_for(tmp_path, tok, name="initial", trainer_kwargs=extra, **overrides).model)
    assert any(not torch.equal(expected[n], initial[n]) for n in expected)  # equality is not trivial
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    if straight.ref_model is not None:
        for (name, a), b in zip(straight.ref_model.named_parameters(), second.ref_model.parameters()):
            assert torch.equal(a, b), name
    # The resumed steps saw the same samples: identical rewards.
    straight_rewards = [r["reward"] for r in train_records(tmp_path / "straight")]
    resumed_rewards = [r["reward"] for r in train_records(tmp_path / "resumed")]
    assert resumed_rewards == straight_rewards


# ---------------------------------------------------------------------- 5. checkpoints
def test_save_steps_and_save_total_limit(tmp_path, tok):
    trainer = trainer_for(tmp_path, tok, max_steps=4, save_steps=1, save_total_limit=2,
                          trainer_kwargs=dict(rollout_func=fixed_rollout))
    trainer.train()
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-3", "checkpoint-4"]
    last = out / "checkpoint-4"
    assert (last / "model.safetensors").is_file()
    assert (last / "tokenizer.json").is_file() and (last / "tokenizer_config.json").is_file()

    reloaded = AutoModelForCausalLM.from_pretrained(last)
    for (name, a), b in zip(trainer.model.named_parameters(), reloaded.parameters()):
        assert torch.equal(a, b), name
    reloaded_tok = AutoTokenizer.from_pretrained(last)
    assert reloaded_tok("3+4=")["input_ids"] == tok("3+4=")["input_ids"]


def test_no_checkpoints_without_save_steps(tmp_path, tok):
    trainer_for(tmp_path, tok, trainer_kwargs=dict(rollout_func=fixed_rollout)).train()
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint-")]


def test_resume_into_a_different_architecture_is_refused(tmp_path, tok):
    trainer_for(tmp_path, tok, save_steps=2, trainer_kwargs=dict(rollout_func=fixed_rollout)).train()
    bigger = trainer_for(tmp_path, tok, model=tiny_model(tok, hidden=48), max_steps=4,
                         trainer_kwargs=dict(rollout_func=fixed_rollout))
    before = params(bigger.model)
    with pytest.raises(ValueError, match="different model.*hidden_size"):
        bigger.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert bigger.state.global_step == 0
    assert all(torch.equal(before[n], p) for n, p in bigger.model.named_parameters())


def test_resume_true_without_checkpoint_is_a_clear_error(tmp_path, tok):
    with pytest.raises(ValueError, match="no complete checkpoint"):
        trainer_for(tmp_path, tok).train(resume_from_checkpoint=True)


# ---------------------------------------------------------------------- 6. PEFT
def test_lora_uses_the_adapter_disabled_policy_as_reference(tmp_path, tok):
    trainer = trainer_for(tmp_path, tok, max_steps=3, beta=0.1, learning_rate=5e-2, save_steps=3,
                          trainer_kwargs=dict(peft_config=lora_config(), rollout_func=fixed_rollout))
    assert trainer.ref_model is None  # no second copy of the model
    before = params(trainer.model)
    trainer.train()
    after = params(trainer.model)

    changed = {n for n in before if not torch.equal(before[n], after[n])}
    lora_b = {n for n in before if "lora_B" in n}
    assert changed and all("lora_" in n for n in changed), changed
    assert lora_b <= changed  # B starts at zero: moving it is what makes the adapter do anything
    records = train_records(tmp_path / "run")
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) for r in records)
    # Step 1: adapter == identity, so policy == reference; afterwards the adapter has moved and the
    # KL against the adapter-disabled model is positive (it would stay 0 against the policy itself).
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert records[-1]["kl"] > 1e-6
    assert (tmp_path / "run" / "checkpoint-3" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------- 7. conversational prompts
def test_conversational_prompts_use_the_chat_template(tmp_path, tok):
    rows = [{"prompt": [{"role": "system", "content": "add"}, {"role": "user", "content": r["prompt"]}],
             "ground_truth": r["ground_truth"]} for r in arithmetic_rows(4)]
    seen = {}

    def record_reward(prompts, completions, completion_ids, ground_truth, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, ground_truth=ground_truth)
        return [float(len(c[0]["content"])) for c in completions]

    model = tiny_model(tok)
    first_inputs = []
    model.register_forward_pre_hook(
        lambda mod, args, kwargs: first_inputs.append(kwargs["input_ids"].clone()) if not first_inputs else None,
        with_kwargs=True)
    trainer = trainer_for(tmp_path, tok, model=model, rows=rows, max_steps=1, reward_funcs=record_reward)
    trainer.train()

    # The model was conditioned on the rendered template, with the assistant turn opened.
    texts = ["".join(t for t in tok.convert_ids_to_tokens(row) if t != tok.pad_token) for row in first_inputs[0].tolist()]
    rendered = {f"<system>add<user>{r['prompt'][1]['content']}<assistant>" for r in rows}
    assert set(texts) <= rendered and len(texts) == 8
    # Rewards see the messages and assistant-message completions.
    assert all(p in [r["prompt"] for r in rows] for p in seen["prompts"])
    assert len(seen["completions"]) == 8
    for completion, ids in zip(seen["completions"], seen["completion_ids"]):
        assert isinstance(completion, list) and len(completion) == 1
        assert completion[0]["role"] == "assistant"
        assert completion[0]["content"] == tok.decode(ids, skip_special_tokens=True)
    truth = {r["prompt"][1]["content"]: r["ground_truth"] for r in rows}
    assert seen["ground_truth"] == [truth[p[1]["content"]] for p in seen["prompts"]]


def test_conversational_evaluate(tmp_path, tok):
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "ground_truth": r["ground_truth"]}
            for r in arithmetic_rows(3)]
    got = []
    trainer = trainer_for(tmp_path, tok, rows=rows, trainer_kwargs=dict(eval_dataset=rows,
                                                                        compute_metrics=lambda p: got.append(p) or {}))
    trainer.evaluate()
    assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in got[0].completions)


# ---------------------------------------------------------------------- 8. bad input
@pytest.mark.parametrize("dataset", [[], datasets.Dataset.from_list([])], ids=["list", "Dataset"])
def test_empty_dataset(tmp_path, tok, dataset):
    with pytest.raises(ValueError, match="empty"):
        trainer_for(tmp_path, tok, rows=dataset)


def test_missing_prompt_column(tmp_path, tok):
    with pytest.raises(ValueError, match="no 'prompt' column.*text"):
        trainer_for(tmp_path, tok, rows=[{"text": "1+1=", "ground_truth": "2"}])


def test_num_generations_below_two(tmp_path):
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        config(tmp_path, num_generations=1)


@pytest.mark.parametrize("overrides", [
    dict(per_device_train_batch_size=6),
    dict(per_device_train_batch_size=2, gradient_accumulation_steps=3),
    dict(per_device_train_batch_size=2, steps_per_generation=1),
    dict(generation_batch_size=6, per_device_train_batch_size=2),
])
def test_batch_not_divisible_by_num_generations(tmp_path, overrides):
    with pytest.raises(ValueError, match=r"divisible by num_generations \(4\)"):
        config(tmp_path, **overrides)


def test_reward_weights_length_mismatch(tmp_path, tok):
    with pytest.raises(ValueError, match="reward_weights has 2 entries for 1 reward functions"):
        trainer_for(tmp_path, tok, reward_weights=[1.0, 2.0])


def test_reward_function_that_raises_names_function_and_sample(tmp_path, tok):
    def picky_reward(completions, **kwargs):
        return [1.0 / ("2" not in c) for c in completions]  # ZeroDivisionError on a "2"

    trainer = trainer_for(tmp_path, tok, reward_funcs=picky_reward,
                          trainer_kwargs=dict(rollout_func=same_groups_rollout))
    before = params(trainer.model)
    # Completions "1", "12", "12a", "12ab" per group: the first with a "2" is index 1.
    with pytest.raises(RuntimeError, match=r"'picky_reward' raised ZeroDivisionError.*index 1 "):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_a_trainer_trains_again_after_a_reward_function_failed(tmp_path, tok):
    """A transient failure (a judge service that was down) leaves the trainer usable: calling
    train() again generates and trains as if the failed call had not happened."""
    calls = {"n": 0}

    def flaky_reward(completions, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("judge unavailable")
        return [float(len(c)) for c in completions]

    trainer = trainer_for(tmp_path, tok, reward_funcs=flaky_reward, max_steps=2,
                          trainer_kwargs=dict(rollout_func=same_groups_rollout))
    with pytest.raises(RuntimeError, match="'flaky_reward' raised ConnectionError"):
        trainer.train()
    assert trainer.train().global_step == 2


@pytest.mark.parametrize("bad, message", [
    (lambda completions, **kw: [0.0] * (len(completions) - 1), "returned 7 rewards, expected 8"),
    (lambda completions, **kw: [math.inf] * len(completions), "returned inf at index 0.*finite"),
    (lambda completions, **kw: 1.0, "returned float; expected a list of 8"),
])
def test_reward_function_bad_output(tmp_path, tok, bad, message):
    bad.__name__ = "bad_reward"
    trainer = trainer_for(tmp_path, tok, reward_funcs=bad, trainer_kwargs=dict(rollout_func=fixed_rollout))
    with pytest.raises(ValueError, match=f"'bad_reward' {message}"):
        trainer.train()


def test_rollout_func_wrong_count(tmp_path, tok):
    trainer = trainer_for(tmp_path, tok, trainer_kwargs=dict(rollout_func=lambda prompts, trainer: [[5]]))
    with pytest.raises(ValueError, match="rollout_func returned 1 completions for 8 prompts"):
        trainer.train()


def test_completion_ids_outside_the_vocabulary_are_named(tmp_path, tok):
    too_big = len(tok) + 7  # tiny_model's vocabulary is the tokenizer's
    trainer = trainer_for(tmp_path, tok, trainer_kwargs=dict(rollout_func=lambda prompts, trainer: [[5, too_big]] * 8))
    with pytest.raises(ValueError, match=f"outside the model's vocabulary of {len(tok)}: \\[{too_big}\\]"):
        trainer.train()


def poisoned_after_step_2(tmp_path, tok, model, poison: dict) -> GRPOTrainer:
    """A 4-step trainer that keeps its weights after step 2 (`trainer.good`), then turns `poison` on."""

    class PoisonAfter2(GRPOTrainer):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                self.good = params(self.model)
                poison["on"] = True

    return trainer_for(tmp_path, tok, cls=PoisonAfter2, model=model, max_steps=4,
                       trainer_kwargs=dict(rollout_func=fixed_rollout))


def test_nan_loss_stops_with_a_loadable_checkpoint_of_the_last_good_state(tmp_path, tok):
    model = tiny_model(tok)
    poison = {"on": False}
    # NaN hidden states (so NaN logits) from step 3 on: what an overflow in the forward pass looks like to the trainer.
    handle = model.model.norm.register_forward_hook(lambda mod, args, out: out * math.nan if poison["on"] else out)

    trainer = poisoned_after_step_2(tmp_path, tok, model, poison)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 3.*checkpoint-2"):
        trainer.train()
    assert trainer.state.global_step == 2
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file()

    fresh = tiny_model(tok, seed=1)
    load_checkpoint(checkpoint, fresh)
    for name, p in fresh.named_parameters():
        assert torch.isfinite(p).all() and torch.equal(p, trainer.good[name]), name

    handle.remove()  # the cause is fixed: the run continues from the saved state
    resumed = trainer_for(tmp_path, tok, max_steps=4, trainer_kwargs=dict(rollout_func=fixed_rollout))
    assert resumed.train(resume_from_checkpoint=True).global_step == 4
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())


def test_non_finite_gradients_stop_before_the_step_with_the_last_good_state(tmp_path, tok):
    """A finite loss whose backward overflows: the step is not taken and the saved state is the last good one."""
    model = tiny_model(tok)
    poison = {"on": False}
    model.model.norm.weight.register_hook(lambda g: g * math.inf if poison["on"] else g)

    trainer = poisoned_after_step_2(tmp_path, tok, model, poison)
    with pytest.raises(FloatingPointError, match=r"gradient norm is (inf|nan) at step 3.*checkpoint-2"):
        trainer.train()
    assert trainer.state.global_step == 2
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, trainer.good[name]), name
    fresh = tiny_model(tok, seed=1)
    load_checkpoint(tmp_path / "run" / "checkpoint-2", fresh)
    for name, p in fresh.named_parameters():
        assert torch.equal(p, trainer.good[name]), name


# ---------------------------------------------------------------------- 9. metrics
TRL_KEYS = {
    "reward", "reward_std", "rewards/digit_reward/mean", "frac_reward_zero_std", "clip_ratio/low_mean",
    "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy", "completions/mean_length", "completions/clipped_ratio",
    "num_tokens", "step_time", "tokens_per_sec", "learning_rate", "grad_norm", "loss",
}


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_metrics_jsonl_and_plot(tmp_path, tok, beta):
    trainer = trainer_for(tmp_path, tok, max_steps=2, beta=beta, learning_rate=2e-3,
                          trainer_kwargs=dict(rollout_func=same_groups_rollout))
    trainer.train()
    out = tmp_path / "run"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    for r in lines:
        expected = TRL_KEYS | ({"kl"} if beta else set())
        assert expected <= set(r), expected - set(r)
        assert ("kl" in r) == bool(beta)
        assert all(isinstance(r[k], (int, float)) and math.isfinite(r[k]) for k in expected), r
        assert r["learning_rate"] == pytest.approx(2e-3)
        assert r["step_time"] > 0 and r["tokens_per_sec"] > 0 and r["grad_norm"] > 0
    assert lines[1]["num_tokens"] == 2 * lines[0]["num_tokens"] > 0  # fixed completions: same count per step
    # Lengths 2, 2, 4, 4 (EOS counted, on the even members); 2 of 4 end without EOS.
    assert lines[0]["completions/mean_length"] == pytest.approx(3.0)
    assert lines[0]["completions/clipped_ratio"] == pytest.approx(0.5)
    assert (out / "metrics.png").stat().st_size > 0


# ---------------------------------------------------------------------- 10. gradient accumulation
class GradRecorder(torch.optim.SGD):
    """SGD that keeps a copy of the gradients it was handed."""

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"] if p.grad is not None]
        return super().step(closure)


def one_step_grads(tmp_path, tok, name, loss_type, batch, accumulation):
    model = tiny_model(tok)
    optimizer = GradRecorder(model.parameters(), lr=0.0)
    # fixed_rollout shifts: "1+1=" -> 1, "2+2=" -> 0: the two micro-batches differ in token count.
    rows = [{"prompt": "1+1=", "ground_truth": "2"}, {"prompt": "2+2=", "ground_truth": "4"}]
    trainer = trainer_for(tmp_path, tok, name=name, model=model, rows=rows, max_steps=1, loss_type=loss_type,
                          per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                          max_grad_norm=0.0, trainer_kwargs=dict(rollout_func=fixed_rollout,
                                                                 optimizers=(optimizer, None)))
    trainer.train()
    return optimizer.grads, trainer.state.log_history[0]["loss"]


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_gradient_accumulation_matches_the_full_batch(tmp_path, tok, loss_type):
    # One generation batch of 8 completions (2 prompts) either way; completions are fixed.
    full, full_loss = one_step_grads(tmp_path, tok, "full", loss_type, batch=8, accumulation=1)
    accumulated, acc_loss = one_step_grads(tmp_path, tok, "accumulated", loss_type, batch=4, accumulation=2)
    assert len(full) == len(accumulated) == len(list(tiny_model(tok).parameters()))
    assert acc_loss == pytest.approx(full_loss, rel=1e-5, abs=1e-7)
    assert any(g.abs().max() > 0 for g in full)
    for a, b in zip(full, accumulated):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_check_can_tell_normalisations_apart(tmp_path, tok):
    # bnpo normalises each micro-batch by its own token count; the two groups here have different
    # counts, so accumulation is not the full-batch gradient: the comparison above is not vacuous.
    full, _ = one_step_grads(tmp_path, tok, "full", "bnpo", batch=8, accumulation=1)
    accumulated, _ = one_step_grads(tmp_path, tok, "accumulated", "bnpo", batch=4, accumulation=2)
    assert not all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(full, accumulated))


# ---------------------------------------------------------------------- 11. rollout_func by name
def test_rollout_func_from_config_string(tmp_path, tok, monkeypatch):
    module = tmp_path / "my_rollouts.py"
    module.write_text(
        "def fours(prompts, trainer):\n"
        "    ids = trainer.tokenizer('44', add_special_tokens=False)['input_ids']\n"
        "    return {'completion_ids': [ids + [trainer.tokenizer.eos_token_id] for _ in prompts]}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []

    def record(completions, **kwargs):
        seen.extend(completions)
        return [0.0] * len(completions)

    trainer = trainer_for(tmp_path, tok, max_steps=1, reward_funcs=record, rollout_func="my_rollouts:fours")
    trainer.train()
    fours = tok("44", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert seen == [tok.decode(fours, skip_special_tokens=True)] * 8


def test_rollout_func_string_that_does_not_import(tmp_path, tok):
    with pytest.raises(ValueError, match="rollout_func 'no_such_module_xyz:f' could not be imported"):
        trainer_for(tmp_path, tok, rollout_func="no_such_module_xyz:f")


# ---------------------------------------------------------------------- 12. reference model sync
def test_sync_ref_model_mixes_reference_toward_policy(tmp_path, tok):
    snapshots = {}

    class Snapshot(GRPOTrainer):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots[state.global_step] = (params(self.ref_model), params(self.model))

    trainer = trainer_for(tmp_path, tok, cls=Snapshot, max_steps=4, beta=0.1, sync_ref_model=True,
                          ref_model_sync_steps=2, ref_model_mixup_alpha=0.25, learning_rate=5e-2,
                          trainer_kwargs=dict(rollout_func=fixed_rollout))
    initial = params(trainer.ref_model)
    trainer.train()

    ref1, _ = snapshots[1]
    ref2, policy2 = snapshots[2]
    ref3, _ = snapshots[3]
    ref4, policy4 = snapshots[4]
    for name in initial:
        assert torch.equal(ref1[name], initial[name])  # step 1: no sync yet
        torch.testing.assert_close(ref2[name], 0.75 * initial[name] + 0.25 * policy2[name])
        assert torch.equal(ref3[name], ref2[name])
        torch.testing.assert_close(ref4[name], 0.75 * ref3[name] + 0.25 * policy4[name])
    moved = [n for n in initial if not torch.equal(policy4[n], initial[n])]
    assert moved and any(not torch.equal(ref4[n], initial[n]) for n in moved)


# ---------------------------------------------------------------------- 11. modes, safety, TRL's options
def mlp_calls(model) -> list[tuple[bool, bool]]:
    """(grad enabled, training) per run of each decoder layer's MLP. The MLP runs inside the layer
    body, so a checkpointed layer's recomputation in backward runs it again. Counted by wrapping
    `forward` on the instance: module forward hooks do not fire inside torch's recomputation."""
    calls = []
    for layer in model.model.layers:
        def counted(*args, _mlp=layer.mlp, _forward=layer.mlp.forward, **kwargs):
            calls.append((torch.is_grad_enabled(), _mlp.training))
            return _forward(*args, **kwargs)
        layer.mlp.forward = counted
    return calls


@pytest.mark.parametrize("checkpointing", [False, True])
def test_update_runs_in_training_mode_and_checkpointing_recomputes(tmp_path, tok, checkpointing):
    model = tiny_model(tok, layers=2).eval()  # from_pretrained hands the model over in eval mode
    calls = mlp_calls(model)
    # steps_per_generation=2: old log-probs are recorded, without gradients, at rollout time.
    trainer = trainer_for(tmp_path, tok, model=model, max_steps=2, steps_per_generation=2,
                          gradient_checkpointing=checkpointing, trainer_kwargs=dict(rollout_func=fixed_rollout))
    trainer.train()
    with_grad = [training for grad, training in calls if grad]
    without_grad = [training for grad, training in calls if not grad]
    assert with_grad and all(with_grad), "the update must run in training mode"
    assert without_grad and not any(without_grad), "old log-probs must run in eval mode"
    # 2 steps x 1 micro-batch x 2 layers; checkpointing runs each layer once more in backward.
    assert len(with_grad) == (8 if checkpointing else 4)


def test_generation_runs_in_eval_mode_and_dropout_trains(tmp_path, tok):
    model = tiny_model(tok).eval()
    model.model.layers[0].mlp.register_forward_pre_hook(lambda mod, args: modes.append(mod.training))
    modes: list[bool] = []
    trainer = trainer_for(tmp_path, tok, model=model, max_steps=1)  # samples with generate
    trainer.train()
    assert False in modes and True in modes and trainer.model.training


class Generations:
    """A reward that records what each generation batch held: its prompts and sampled ids."""

    __name__ = "recorded_digit_reward"

    def __init__(self):
        self.batches = []

    def __call__(self, prompts, completion_ids, **kwargs):
        self.batches.append((list(prompts), [list(c) for c in completion_ids]))
        return digit_reward(completion_ids)


@pytest.mark.parametrize("steps_per_generation, fail_at, save_steps", [(1, 3, None), (2, 2, 1)],
                         ids=["fresh-generation", "pending-micro-batches"])
def test_resume_after_nan_trains_on_the_rows_of_an_uninterrupted_run(tmp_path, tok, monkeypatch, steps_per_generation,
                                                                      fail_at, save_steps):
    common = dict(max_steps=4, steps_per_generation=steps_per_generation, save_steps=save_steps)
    reference = Generations()
    trainer_for(tmp_path, tok, name="reference", reward_funcs=reference, **common).train()
    expected_losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "reference" / "metrics.jsonl")}

    model = tiny_model(tok)
    poison = {"on": False}
    # NaN hidden states in the update only (generation runs without gradients and stays finite).
    model.model.norm.register_forward_hook(
        lambda mod, args, out: out * math.nan if poison["on"] and torch.is_grad_enabled() else out)

    class PoisonAfter(GRPOTrainer):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == fail_at - 1:
                poison["on"] = True

    first = Generations()
    trainer = trainer_for(tmp_path, tok, name="failed", cls=PoisonAfter, model=model, reward_funcs=first, **common)
    saved_steps = []
    save = ckpt.save_checkpoint
    monkeypatch.setattr(ckpt, "save_checkpoint", lambda out, step, *a, **k: saved_steps.append(step) or save(out, step, *a, **k))
    with pytest.raises(FloatingPointError, match=f"at step {fail_at}.*checkpoint-{fail_at - 1}"):
        trainer.train()
    assert saved_steps == list(range(1, fail_at)) if save_steps else [fail_at - 1]  # none saved twice

    resumed = Generations()
    trainer = trainer_for(tmp_path, tok, name="failed", reward_funcs=resumed, **common)
    trainer.train(resume_from_checkpoint=True)
    done = len(first.batches) - (1 if steps_per_generation == 1 else 0)  # the failed step's generation
    assert first.batches[:done] == reference.batches[:done]
    assert resumed.batches == reference.batches[done:]
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "failed" / "metrics.jsonl")}
    for step in range(fail_at, 5):
        assert losses[step] == pytest.approx(expected_losses[step], rel=1e-5, abs=1e-7), step


def test_a_new_run_into_a_used_output_dir_is_refused(tmp_path, tok):
    first = trainer_for(tmp_path, tok, max_steps=1, trainer_kwargs=dict(rollout_func=fixed_rollout))
    first.train()
    first.save_model(tmp_path / "run" / "final")
    log = (tmp_path / "run" / "metrics.jsonl").read_text()
    second = trainer_for(tmp_path, tok, max_steps=1, trainer_kwargs=dict(rollout_func=fixed_rollout))
    with pytest.raises(ValueError, match=f"output_dir {tmp_path / 'run'} already holds a run.*overwrite_output_dir"):
        second.train()
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == log
    third = trainer_for(tmp_path, tok, max_steps=2, overwrite_output_dir=True, trainer_kwargs=dict(rollout_func=fixed_rollout))
    third.train()
    assert [r["step"] for r in train_records(tmp_path / "run")] == [1, 2]
    assert not (tmp_path / "run" / "final").exists()


def test_an_output_dir_that_is_a_file_is_named(tmp_path, tok):
    (tmp_path / "run").write_text("notes")
    with pytest.raises(ValueError, match=f"output_dir {tmp_path / 'run'} is a file, not a folder"):
        trainer_for(tmp_path, tok, max_steps=1, trainer_kwargs=dict(rollout_func=fixed_rollout)).train()
    assert (tmp_path / "run").read_text() == "notes"


def test_evaluation_without_an_eval_dataset_is_refused_before_training(tmp_path, tok):
    with pytest.raises(ValueError, match="eval_strategy='steps' needs an eval_dataset"):
        trainer_for(tmp_path, tok, max_steps=2, eval_strategy="steps", eval_steps=1)
    assert not (tmp_path / "run").exists()


def test_a_prompt_without_tokens_is_named(tmp_path, tok):
    rows = arithmetic_rows(4)
    rows[1] = {**rows[1], "prompt": ""}
    trainer = trainer_for(tmp_path, tok, rows=rows, max_steps=2, shuffle_dataset=False)
    with pytest.raises(ValueError, match="a prompt tokenizes to no tokens \\(''\\)"):
        trainer.train()


def test_step_callbacks_bracket_the_generation(tmp_path, tok):
    recorder = Recorder()

    def recording_rollout(prompts, trainer):
        recorder.events.append("generate")
        return fixed_rollout(prompts, trainer)

    trainer_for(tmp_path, tok, max_steps=2, rows=arithmetic_rows(2),
                trainer_kwargs=dict(callbacks=[recorder], rollout_func=recording_rollout)).train()
    step = ["on_epoch_begin", "on_step_begin", "generate", "on_step_end", "on_log", "on_epoch_end"]
    assert recorder.events == ["on_train_begin", *step, *step, "on_train_end"]


def test_a_run_without_matplotlib_trains_and_saves(tmp_path, tok, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without it looks like
    trainer = trainer_for(tmp_path, tok, max_steps=1, save_steps=1, trainer_kwargs=dict(rollout_func=fixed_rollout))
    trainer.train()
    out = tmp_path / "run"
    assert (out / "metrics.jsonl").exists() and (out / "checkpoint-1").is_dir() and not (out / "metrics.png").exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "note: skipped" in err and "matplotlib" in err


def test_report_to_none_writes_no_integration_logs(tmp_path, tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing it would fail loudly
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    trainer_for(tmp_path, tok, max_steps=1, report_to="none", trainer_kwargs=dict(rollout_func=fixed_rollout)).train()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl", "metrics.png"]


@pytest.mark.parametrize("kind, kwargs", [("constant", None), ("constant_with_warmup", None), ("linear", None),
                                          ("cosine_with_min_lr", {"min_lr": 1e-3})])
def test_schedules_are_transformers(tmp_path, tok, kind, kwargs):
    from transformers import get_scheduler

    trainer = trainer_for(tmp_path, tok, max_steps=4, warmup_steps=2, lr_scheduler_type=kind, lr_scheduler_kwargs=kwargs,
                          trainer_kwargs=dict(rollout_func=fixed_rollout))
    trainer.train()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    expected = get_scheduler(kind, optimizer, num_warmup_steps=2, num_training_steps=4, scheduler_specific_kwargs=kwargs)
    lrs = []
    for _ in range(4):
        lrs.append(expected.get_last_lr()[0])
        optimizer.step()
        expected.step()
    assert [r["learning_rate"] for r in train_records(tmp_path / "run")] == pytest.approx(lrs)
    if kind == "constant":
        assert lrs == [1e-2] * 4  # transformers' "constant" has no warmup


def test_warmup_fraction_and_optim(tmp_path, tok):
    trainer = trainer_for(tmp_path, tok, max_steps=10, warmup_steps=0.25, optim="adamw_torch")
    assert trainer.args.warmup_for(10) == 3
    assert trainer.optimizer.defaults["fused"] is False
    assert trainer_for(tmp_path, tok, name="b", optim="adamw_torch_fused").optimizer.defaults["fused"] is True


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision(tmp_path, tok, precision):
    trainer = trainer_for(tmp_path, tok, max_steps=2, **{precision: True}, save_steps=2,
                          trainer_kwargs=dict(rollout_func=fixed_rollout))
    seen = []
    trainer.model.model.layers[0].mlp.down_proj.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    trainer.train()
    assert set(seen) == {getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[precision])}
    assert (trainer.scaler is not None) == (precision == "fp16")
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_weights_load_in_float32_as_in_trl(tmp_path, tok):
    tiny_model(tok).to(torch.bfloat16).save_pretrained(tmp_path / "bf16-model")
    trainer = GRPOTrainer(config(tmp_path), model=str(tmp_path / "bf16-model"), tokenizer=tok,
                          train_dataset=arithmetic_rows(4), reward_funcs=digit_reward)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    trainer = GRPOTrainer(config(tmp_path, model_init_kwargs={"dtype": "bfloat16"}), model=str(tmp_path / "bf16-model"),
                          tokenizer=tok, train_dataset=arithmetic_rows(4), reward_funcs=digit_reward)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}


def test_rollout_options_come_from_trl_fields(tmp_path, tok, monkeypatch):
    import dataclasses

    import atlas_fast.trainer as trainer_module

    trainer = trainer_for(tmp_path, tok, generation_kwargs={"no_repeat_ngram_size": 2})
    assert trainer.rollout.generation_kwargs == {"no_repeat_ngram_size": 2}
    trainer.args = dataclasses.replace(trainer.args, use_vllm=True, vllm_mode="server", vllm_server_host="127.0.0.1",
                                       vllm_server_port=8123, vllm_server_timeout=30.0, generation_kwargs=None)
    assert trainer.args.rollout_backend == "vllm_server"
    assert trainer._rollout_options() == {"base_url": "http://127.0.0.1:8123", "timeout": 30.0}
    trainer.args = dataclasses.replace(trainer.args, vllm_server_base_url="http://10.0.0.1:9000")
    assert trainer._rollout_options()["base_url"] == "http://10.0.0.1:9000"
    trainer.args = dataclasses.replace(trainer.args, rollout_backend="hf", use_vllm=True, vllm_mode="colocate",
                                       vllm_gpu_memory_utilization=0.5, vllm_enable_sleep_mode=True)
    assert trainer._rollout_options() == {"gpu_memory_utilization": 0.5, "enable_sleep_mode": True,
                                          "max_model_len": 512 + 6}

    def strict_backend(name, model, tokenizer, **options):
        def construct(*, base_url):
            return None
        return construct(**options)

    monkeypatch.setattr(trainer_module, "build_backend", strict_backend)
    with pytest.raises(ValueError, match=r"rollout_backend='vllm_server' does not take.*timeout"):
        trainer_for(tmp_path, tok, use_vllm=True, vllm_mode="server")


@pytest.mark.parametrize("strategy", ["epoch", "no"])
def test_logging_eval_and_save_strategies(tmp_path, tok, strategy):
    # 4 rows, 2 prompts per step: an epoch ends every 2 steps.
    trainer = trainer_for(tmp_path, tok, rows=arithmetic_rows(4), max_steps=4, logging_strategy=strategy,
                          eval_strategy=strategy, save_strategy=strategy, save_steps=1,
                          trainer_kwargs=dict(eval_dataset=arithmetic_rows(2, seed=1), rollout_func=fixed_rollout))
    trainer.train()
    out = tmp_path / "run"
    records = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    expected = [2, 4] if strategy == "epoch" else []
    assert [r["step"] for r in records if "reward" in r] == expected
    assert [r["step"] for r in records if "eval/reward" in r] == expected
    assert sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) == expected


def test_logging_first_step_eval_on_start_and_data_seed(tmp_path, tok):
    prompts = {}

    def recording_rollout(batch_prompts, trainer):
        prompts.setdefault(trainer.args.output_dir, []).append(list(batch_prompts))
        return fixed_rollout(batch_prompts, trainer)

    kwargs = dict(max_steps=3, logging_steps=2, trainer_kwargs=dict(eval_dataset=arithmetic_rows(2, seed=1),
                                                                   rollout_func=recording_rollout))
    trainer = trainer_for(tmp_path, tok, logging_first_step=True, eval_on_start=True, **kwargs)
    trainer.train()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if "eval/reward" in r] == [0]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    # data_seed orders the prompts; seed alone no longer does once data_seed is set.
    for name, extra in (("a", dict(seed=1, data_seed=5)), ("b", dict(seed=2, data_seed=5)), ("c", dict(seed=2))):
        trainer_for(tmp_path, tok, name=name, **extra, **kwargs).train()
    runs = {name: prompts[str(tmp_path / name)] for name in "abc"}
    assert runs["a"] == runs["b"] != runs["c"]


def test_chat_template_kwargs_reach_the_template(tmp_path, tok):
    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ suffix | default('') }}"
    trainer = trainer_for(tmp_path, tok, chat_template_kwargs={"suffix": "="})
    ids = trainer._tokenize_prompts([[{"role": "user", "content": "1+2"}]])
    assert ids[0] == tok("1+2=", add_special_tokens=False)["input_ids"]


def test_a_column_a_reward_function_needs_is_checked_before_training(tmp_path, tok):
    def needs_answer(completions, answer_key, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match=r"reward function 'needs_answer' needs the column\(s\) \['answer_key'\], which "
                                         r"the train dataset lacks \(its columns: prompt, ground_truth\)"):
        trainer_for(tmp_path, tok, reward_funcs=[needs_answer])


def test_set_training_switches_every_module_whatever_the_root_says():
    from atlas_fast.trainer import _set_training

    model = tiny_model(char_tokenizer())
    _set_training(model, False)
    assert not any(m.training for m in model.modules())
    _set_training(model, True)
    assert all(m.training for m in model.modules())
    model.model.layers[0].eval()  # a root in train mode over a layer that is not (a PEFT wrapper of an eval model)
    assert model.training
    _set_training(model, True)
    assert all(m.training for m in model.modules())


def test_a_lora_policy_made_from_an_eval_model_trains_its_base_layers_in_train_mode(tmp_path):
    tok = char_tokenizer()
    config = GRPOConfig(output_dir=str(tmp_path / "o"), max_steps=1, num_generations=4, per_device_train_batch_size=4,
                        max_completion_length=6, disable_tqdm=True, beta=0.0, report_to="none")
    base = tiny_model(tok, layers=2).eval()  # as from_pretrained returns it; get_peft_model keeps the layers so
    trainer = GRPOTrainer(config, model=base, tokenizer=tok, train_dataset=arithmetic_rows(8),
                          reward_funcs=[lambda completion_ids, **kw: [float(len(c)) for c in completion_ids]],
                          peft_config=lora_config(), rollout_func=fixed_rollout)
    seen = []
    layer = trainer.model.get_base_model().model.layers[0]
    layer.register_forward_pre_hook(lambda m, args: seen.append(m.training) if torch.is_grad_enabled() else None)
    trainer.train()
    assert seen and all(seen)  # dropout (LoRA's and the model's) acts in the update, as in transformers' Trainer


def test_evaluate_before_resuming_keeps_the_run_that_overwrite_would_clear(tmp_path, tok):
    ev = dict(eval_dataset=arithmetic_rows(4, seed=5))
    trainer_for(tmp_path, tok, max_steps=4, save_steps=1, trainer_kwargs=dict(callbacks=[StopAt(2)], **ev)).train()
    resumed = trainer_for(tmp_path, tok, max_steps=4, save_steps=1, overwrite_output_dir=True, trainer_kwargs=ev)
    before = resumed.evaluate()  # not yet a run of its own: nothing in the folder is cleared
    assert {p.name for p in (tmp_path / "run").glob("checkpoint-*")} == {"checkpoint-1", "checkpoint-2"}
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/reward" in r]
    assert evals and evals[0]["eval/reward"] == before["eval/reward"]  # written once the run claimed the folder


def test_the_last_step_is_saved_and_evaluated_as_transformers_ends_a_run(tmp_path, tok):
    trainer = trainer_for(tmp_path, tok, max_steps=3, save_steps=2, eval_strategy="steps", eval_steps=2,
                          trainer_kwargs=dict(rollout_func=fixed_rollout, eval_dataset=arithmetic_rows(2, seed=1)))
    trainer.train()
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert [r["step"] for r in trainer.state.log_history if "eval/reward" in r] == [2, 3]


def test_logged_completions_carry_the_step_metrics_give_them(tmp_path, tok):
    trainer_for(tmp_path, tok, max_steps=2, log_completions=True, trainer_kwargs=dict(rollout_func=fixed_rollout)).train()
    steps = [r["step"] for r in train_records(tmp_path / "run")]
    assert sorted(p.name for p in (tmp_path / "run" / "completions").iterdir()) == [f"step-{s}.jsonl" for s in steps]


def test_overwrite_clears_an_interrupted_save_of_the_old_run(tmp_path, tok):
    trainer_for(tmp_path, tok, max_steps=3, save_steps=3, trainer_kwargs=dict(rollout_func=fixed_rollout)).train()
    run = tmp_path / "run"
    (run / "checkpoint-3").rename(run / ".tmp-old-checkpoint-3")  # a crash between a re-save's two renames
    trainer_for(tmp_path, tok, max_steps=2, save_steps=1, overwrite_output_dir=True,
                trainer_kwargs=dict(rollout_func=fixed_rollout)).train()
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-1", "checkpoint-2"]


def test_resuming_with_a_beta_the_saved_micro_batches_lack_log_probs_for_is_refused_up_front(tmp_path, tok):
    base = dict(max_steps=4, steps_per_generation=4, per_device_train_batch_size=4, max_completion_length=4, save_steps=1)
    trainer_for(tmp_path, tok, trainer_kwargs=dict(callbacks=[StopAt(1)]), **base).train()  # beta 0: no reference
    resumed = trainer_for(tmp_path, tok, **{**base, "beta": 0.1})
    weights = params(resumed.model)
    with pytest.raises(ValueError, match="beta=0.1: the checkpoint holds micro-batches generated without ref logps"):
        resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 0
    assert all(torch.equal(weights[n], p) for n, p in resumed.model.named_parameters())


def test_an_epoch_ends_with_the_step_that_trains_its_last_rows(tmp_path, tok):
    # 4 rows, 2 prompts per generation batch, each batch trained over 2 optimizer steps: an epoch
    # is 4 steps, and its last rows are generated at step 3 but trained at step 4.
    ends = []

    class Ends(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            ends.append(state.global_step)

    trainer = trainer_for(tmp_path, tok, rows=arithmetic_rows(4), max_steps=-1, num_train_epochs=2,
                          per_device_train_batch_size=4, steps_per_generation=2, eval_strategy="epoch",
                          save_strategy="epoch", trainer_kwargs=dict(rollout_func=fixed_rollout, callbacks=[Ends()],
                                                                     eval_dataset=arithmetic_rows(2, seed=1)))
    trainer.train()
    assert ends == [4, 8]
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert [r["step"] for r in trainer.state.log_history if "eval/reward" in r] == [4, 8]


def test_overwrite_clears_the_reward_tables_of_the_old_run(tmp_path, tok):
    class Tabled:
        __name__ = "tabled"

        def __call__(self, completion_ids, **kwargs):
            rewards = digit_reward(completion_ids)
            self.last_table = ("judge_notes", [{"r": r} for r in rewards[:1]])
            return rewards

    for _ in range(2):
        trainer_for(tmp_path, tok, max_steps=2, reward_funcs=Tabled(), overwrite_output_dir=True,
                    trainer_kwargs=dict(rollout_func=fixed_rollout)).train()
        lines = (tmp_path / "run" / "judge_notes.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 2]  # this run's rows only


def test_several_processes_are_refused_before_anything_loads(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets for each of 2 ranks
    with pytest.raises(ValueError, match="trains in one process, and this is one of 2"):
        trainer_for(tmp_path, tok)
    assert not (tmp_path / "run").exists()


def test_resuming_pending_micro_batches_with_other_batch_settings_is_refused_up_front(tmp_path, tok):
    base = dict(max_steps=4, steps_per_generation=4, per_device_train_batch_size=4, max_completion_length=4, save_steps=1)
    trainer_for(tmp_path, tok, trainer_kwargs=dict(callbacks=[StopAt(1)]), **base).train()  # 3 micro-batches pending
    resumed = trainer_for(tmp_path, tok, **{**base, "num_generations": 2})
    before, weights = resumed.optimizer.state_dict(), params(resumed.model)
    with pytest.raises(ValueError, match=r"num_generations 4 -> 2.*3 micro-batches"):
        resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 0 and resumed.optimizer.state_dict() == before
    assert all(torch.equal(weights[n], p) for n, p in resumed.model.named_parameters())  # not the checkpoint's


def test_resuming_at_a_generation_boundary_with_other_batch_settings_warns(tmp_path, tok):
    base = dict(max_steps=3, max_completion_length=4, save_steps=1, trainer_kwargs=dict(rollout_func=fixed_rollout))
    trainer_for(tmp_path, tok, **{**base, "trainer_kwargs": dict(rollout_func=fixed_rollout, callbacks=[StopAt(1)])}).train()
    resumed = trainer_for(tmp_path, tok, per_device_train_batch_size=4, **base)
    with pytest.warns(UserWarning, match="per_device_train_batch_size 8 -> 4"):
        resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # unchanged settings: no warning
        again = trainer_for(tmp_path, tok, per_device_train_batch_size=4, **{**base, "max_steps": 4})
        again.train(resume_from_checkpoint=True)


def gradients_at_step(trainer) -> dict[str, torch.Tensor]:
    """Filled with the gradients the optimizer steps with (after clipping)."""
    got = {}

    def capture(optimizer, args, kwargs):
        got.update({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None})

    trainer.optimizer.register_step_pre_hook(capture)
    return got


MERGE_CASES = {
    "grpo": dict(loss_type="grpo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "dapo": dict(loss_type="dapo"),
    "bnpo": dict(loss_type="bnpo"),
    "cispo+old_logps": dict(loss_type="cispo", num_iterations=2),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", steps_per_generation=8),
}


@pytest.mark.parametrize("padding_free", [False, True])
@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_micro_batches_merged_under_max_forward_tokens_train_as_apart(tmp_path, tok, case, padding_free):
    # One step: a second would sample from weights that differ in the last bits, and diverge. fp32
    # throughout (bf16 autocast, the default on a GPU, rounds differently at each pass's shapes).
    loss_type = MERGE_CASES[case]["loss_type"]
    base = dict(max_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=4, max_completion_length=5,
                temperature=1.5, beta=0.1, padding_free=padding_free, bf16=False, **MERGE_CASES[case])
    apart = trainer_for(tmp_path, tok, name="apart", **base)
    expected = gradients_at_step(apart)
    apart.train()
    merged = trainer_for(tmp_path, tok, name="merged", max_forward_tokens=10**6, **base)
    got = gradients_at_step(merged)
    passes = []
    loss = merged._loss
    merged._loss = lambda mb: passes.append(len(mb.advantages)) or loss(mb)
    merged.train()
    # bnpo normalises each micro-batch by its own tokens: never merged
    assert passes == ([4] * 4 if loss_type == "bnpo" else [16])
    assert expected.keys() == got.keys() and any(float(g.abs().max()) > 0 for g in expected.values())
    for name, g in expected.items():
        assert float((g - got[name]).norm()) <= 1e-5 * float(g.norm()) + 1e-9, name
    ra, rm = train_records(tmp_path / "apart"), train_records(tmp_path / "merged")
    assert [r["reward"] for r in ra] == [r["reward"] for r in rm]
    for x, y in zip(ra, rm):
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-5, abs_tol=1e-7)


def test_max_forward_tokens_merges_only_what_fits(tmp_path, tok):
    def passes_with(budget, name):
        trainer = trainer_for(tmp_path, tok, name=name, max_steps=1, per_device_train_batch_size=4,
                              gradient_accumulation_steps=4, padding_free=True, max_forward_tokens=budget,
                              trainer_kwargs=dict(rollout_func=fixed_rollout))
        passes = []
        loss = trainer._loss
        trainer._loss = lambda mb: passes.append((len(mb.advantages), int(mb.attention_mask.sum()))) or loss(mb)
        trainer.train()
        return passes

    sizes = [tokens for _, tokens in passes_with(None, "apart")]  # the four micro-batches' packed tokens
    assert len(sizes) == 4
    budget = max(sizes[0] + sizes[1], sizes[2] + sizes[3])
    assert sum(sizes[:3]) > budget  # so the first pass stops after two
    assert passes_with(budget, "pairs") == [(8, sizes[0] + sizes[1]), (8, sizes[2] + sizes[3])]
    assert [rows for rows, _ in passes_with(1, "single")] == [1] * 16  # nothing fits: each row alone


def test_a_resume_refused_for_other_data_leaves_the_model_alone(tmp_path, tok):
    base = dict(max_steps=3, save_steps=1, trainer_kwargs=dict(rollout_func=fixed_rollout))
    trainer_for(tmp_path, tok, **{**base, "trainer_kwargs": dict(rollout_func=fixed_rollout, callbacks=[StopAt(1)])}).train()
    resumed = trainer_for(tmp_path, tok, rows=arithmetic_rows(20), **base)
    weights = params(resumed.model)
    with pytest.raises(ValueError, match="num_rows=16 but this sampler has num_rows=20"):
        resumed.train(resume_from_checkpoint=True)
    assert all(torch.equal(weights[n], p) for n, p in resumed.model.named_parameters())


def test_resuming_pending_micro_batches_with_other_reward_scaling_is_refused(tmp_path, tok):
    base = dict(max_steps=4, steps_per_generation=4, per_device_train_batch_size=4, max_completion_length=4, save_steps=1)
    trainer_for(tmp_path, tok, trainer_kwargs=dict(callbacks=[StopAt(1)]), **base).train()  # 3 micro-batches pending
    resumed = trainer_for(tmp_path, tok, **{**base, "scale_rewards": "batch"})
    with pytest.raises(ValueError, match=r"scale_rewards 'group' -> 'batch'.*3 micro-batches"):
        resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 0
