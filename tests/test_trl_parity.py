"""Optimizer steps of atlas_fast's GRPOTrainer against TRL 1.16's, on identical completions.

Both trainers load the same saved tiny model, see the same prompts, train on the same fixed
completions (lengths 2 to 6; most end with EOS, one at exactly max_completion_length, two are cut
at max_completion_length) and score them with the same reward function. The loss each logs and
the gradients handed to the optimizer must agree to fp32 precision.

How the completions are fixed:
- atlas_fast: `rollout_func(prompts, trainer)`.
- TRL: `_generate_single_turn`, the method that turns prompt ids into completion ids, is replaced
  on the trainer instance. Everything around it still runs: TRL's prompt tokenisation and
  padding, reference and old log-probs, rewards, advantages and loss. (TRL's public
  `rollout_func` would also bypass its prompt tokenisation.) Completions are looked up by prompt
  ids, so the pairing of prompt and completion does not depend on either sampler's order.

TRL settings pinned away from its defaults, and why:
- `use_bias_correction_kl` is set explicitly on both sides: False for the main grid (plain k3,
  as ATLAS uses it), True in `test_kl_bias_correction_matches_trl` (TRL 1.16's default).
- `shuffle_sequence_dict` is the identity: TRL shuffles the rows of a generation batch before
  cutting it into micro-batches, atlas_fast keeps group order. Only micro-batch composition
  changes, which matters for bnpo's per-micro-batch normaliser once the batch is split.
- `max_grad_norm=1e6` on both sides: clipping would rescale both gradients to norm 1 and hide a
  wrong loss scale; the pre-clip norm is compared through the logged `grad_norm`.

TRL calls the model without `position_ids`; atlas_fast derives them from the attention mask. With
left-padded prompts that shifts every row's positions, which RoPE turns into the same relative
offsets, so the mixed-length case below holds to the same 1e-5 (the observed gap is ~1e-6).
"""
from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import trl.trainer.grpo_trainer as trl_grpo_module  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from atlas_fast.config import GRPOConfig as AtlasConfig  # noqa: E402
from atlas_fast.trainer import GRPOTrainer as AtlasTrainer  # noqa: E402
from tiny import arithmetic_rows, char_tokenizer, tiny_model  # noqa: E402

RTOL = 1e-5
G = 4  # completions per prompt
MAX_COMPLETION = 6

# G completions per prompt: (text, ends with EOS). "1+1=2" + EOS ends exactly at the limit; the
# EOS-less ones are what a sampler cut at max_completion_length returns.
GROUP_A = [("7", True), ("14", True), ("1+1=2", True), ("777777", False)]
GROUP_B = [("9", True), ("99999a", False), ("x+y", True), ("1234", True)]


def reward_shape(completions, **kwargs):
    """A function of the text alone, so both trainers score a completion the same way."""
    out = []
    for text in completions:
        text = "".join(text.split())  # the char tokenizer decodes with spaces between tokens
        out.append(len(set(text)) / 3 + (0.5 if text.isdigit() else 0.0))
    return out


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def completion_table(tok, prompts: list[str]) -> dict[tuple[int, ...], list[list[int]]]:
    """Prompt ids -> the G completion ids both trainers must train on for that prompt."""
    table = {}
    for i, prompt in enumerate(prompts):
        group = GROUP_A if i % 2 == 0 else GROUP_B
        table[tuple(ids_of(tok, prompt))] = [ids_of(tok, text) + ([tok.eos_token_id] if eos else [])
                                            for text, eos in group]
    return table


def lookup(table, prompt_ids_per_row) -> list[list[int]]:
    """The k-th row holding a prompt gets that prompt's k-th completion, whatever the row order."""
    seen: dict[tuple[int, ...], int] = {}
    out = []
    for ids in prompt_ids_per_row:
        key = tuple(int(t) for t in ids)
        k = seen.get(key, 0)
        seen[key] = k + 1
        out.append(list(table[key][k % G]))
    return out


def distinct_prompts(n: int) -> list[str]:
    """n different "a+b=" prompts, all four tokens long: no prompt padding at all."""
    prompts: list[str] = []
    for row in arithmetic_rows(4 * n, seed=1):
        if row["prompt"] not in prompts:
            prompts.append(row["prompt"])
    assert len(prompts) >= n
    return prompts[:n]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """One saved tiny model: both policies and TRL's reference model load these exact weights."""
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model(char_tokenizer(), seed=0).save_pretrained(path)
    return str(path)


def base_settings(**overrides):
    """Field names and meanings shared by both configs."""
    settings = dict(
        num_generations=G, per_device_train_batch_size=8, gradient_accumulation_steps=1,
        max_completion_length=MAX_COMPLETION, temperature=0.7, learning_rate=2e-3, max_grad_norm=1e6,
        logging_steps=1, seed=0, loss_type="dapo", beta=0.0, num_iterations=1, max_steps=1, bf16=False,
        use_bias_correction_kl=False,
    )
    settings.update(overrides)
    return settings


# ---------------------------------------------------------------------- running the two trainers
class Run:
    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []  # per optimizer step, as the optimizer sees them
        self.logs: list[dict] = []  # per optimizer step
        self.generations = 0


def _grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def run_atlas(model_dir, prompts, settings, out_dir) -> Run:
    run = Run()
    tok = char_tokenizer()
    table = completion_table(tok, prompts)

    def rollout(batch_prompts, trainer):
        run.generations += 1
        return lookup(table, [ids_of(tok, p) for p in batch_prompts])

    config = AtlasConfig(output_dir=str(out_dir), report_to=(), disable_tqdm=True, shuffle_dataset=False, **settings)
    trainer = AtlasTrainer(config=config, model=model_dir, tokenizer=tok,
                           train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in prompts]),
                           reward_funcs=reward_shape, rollout_func=rollout)
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: run.grads.append(_grads_of(trainer.model)))
    trainer.train()
    run.logs = [r for r in trainer.state.log_history if "loss" in r]
    return run


class _GradRecorder(TrainerCallback):
    def __init__(self, run: Run):
        self.run = run

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.run.grads.append(_grads_of(model))


def run_trl(model_dir, prompts, settings, out_dir, monkeypatch, **trl_overrides) -> Run:
    run = Run()
    tok = char_tokenizer()
    table = completion_table(tok, prompts)
    monkeypatch.setattr(trl_grpo_module, "shuffle_sequence_dict", lambda batch: batch)
    options = {k: v for k, v in settings.items() if k != "use_kernels"}
    # atlas_fast trains on CUDA when it is there; keep TRL on the same device.
    options.update(output_dir=str(out_dir), report_to="none", use_cpu=not torch.cuda.is_available(),
                   activation_checkpointing=False, save_strategy="no", disable_tqdm=True,
                   shuffle_dataset=False, dataloader_num_workers=0)
    options.update(trl_overrides)
    trainer = trl.GRPOTrainer(model=model_dir, reward_funcs=reward_shape, args=trl.GRPOConfig(**options),
                              train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in prompts]),
                              processing_class=tok, callbacks=[_GradRecorder(run)])

    def fixed_generation(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        run.generations += 1
        return lookup(table, prompt_ids), None  # no sampler log-probs, as with HF generation

    trainer._generate_single_turn = fixed_generation
    trainer.train()
    run.logs = [r for r in trainer.state.log_history if "loss" in r]
    return run


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def assert_same_steps(atlas: Run, ref: Run, rtol: float = RTOL) -> None:
    assert atlas.generations == ref.generations >= 1, "both trainers must train on the fixed completions"
    assert len(atlas.grads) == len(ref.grads) == len(atlas.logs) == len(ref.logs) >= 1
    for step, (a_log, t_log, a_grads, t_grads) in enumerate(zip(atlas.logs, ref.logs, atlas.grads, ref.grads), 1):
        # Losses can be ~1e-7 (grpo's first step averages zero-mean advantages): absolute floor.
        assert a_log["loss"] == pytest.approx(t_log["loss"], rel=rtol, abs=1e-7), f"loss at step {step}"
        assert a_log["grad_norm"] == pytest.approx(t_log["grad_norm"], rel=rtol), f"grad_norm at step {step}"
        if "kl" in t_log:
            assert a_log["kl"] == pytest.approx(t_log["kl"], rel=rtol, abs=1e-7), f"kl at step {step}"
        assert a_grads.keys() == t_grads.keys()
        for name, expected in t_grads.items():
            err = rel_err(a_grads[name], expected)
            assert err <= rtol, f"grad of {name} at step {step}: relative error {err:.2e}"


def check_parity(model_dir, tmp_path, monkeypatch, prompts, settings, **trl_overrides) -> tuple[Run, Run]:
    atlas = run_atlas(model_dir, prompts, settings, tmp_path / "atlas")
    ref = run_trl(model_dir, prompts, settings, tmp_path / "trl", monkeypatch, **trl_overrides)
    assert_same_steps(atlas, ref)
    return atlas, ref


# ---------------------------------------------------------------------- the fixture is meaningful
def test_completions_and_rewards_exercise_the_loss():
    tok = char_tokenizer()
    prompts = distinct_prompts(2)
    table = completion_table(tok, prompts)
    comps = [c for group in table.values() for c in group]
    assert all(1 <= len(c) <= MAX_COMPLETION for c in comps)
    assert any(c[-1] == tok.eos_token_id and len(c) == MAX_COMPLETION for c in comps)  # EOS at the limit
    assert any(c[-1] != tok.eos_token_id and len(c) == MAX_COMPLETION for c in comps)  # truncated
    assert len({len(c) for c in comps}) >= 4
    for group in table.values():
        rewards = reward_shape(tok.batch_decode(group, skip_special_tokens=True))
        assert len(set(rewards)) >= 3, "every group needs spread rewards, or its advantages vanish"


# ---------------------------------------------------------------------- the grid
# These run atlas_fast's production path, the fused kernels (through the Triton interpreter on CPU).
@pytest.mark.parametrize("num_iterations", [1, 2])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_step_matches_trl(model_dir, tmp_path, monkeypatch, loss_type, beta, num_iterations):
    # With num_iterations=2 the second optimizer step reuses the batch under updated weights: the
    # ratio leaves 1, clipping acts and the KL is non-zero. Both steps are compared.
    settings = base_settings(loss_type=loss_type, beta=beta, num_iterations=num_iterations, max_steps=num_iterations)
    _, ref = check_parity(model_dir, tmp_path, monkeypatch, distinct_prompts(2), settings)
    if num_iterations == 2:
        assert ref.logs[-1]["clip_ratio/region_mean"] > 0, "the reused step should clip some tokens"


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_gradient_accumulation_matches_trl(model_dir, tmp_path, monkeypatch, loss_type):
    # Two micro-batches of one group each per optimizer step: per-micro-batch normalisers (bnpo),
    # the 1 / gradient_accumulation_steps scaling and dapo's batch-wide token count all show here.
    settings = base_settings(loss_type=loss_type, beta=0.04, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, num_iterations=2, max_steps=2)
    check_parity(model_dir, tmp_path, monkeypatch, distinct_prompts(2), settings)


# ---------------------------------------------------------------------- variations
# Trainer plumbing and options. These use atlas_kernels.reference, the plain-PyTorch twin of the
# kernels (checked against them in tests/kernels), which keeps each case to a couple of seconds.
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_generation_spanning_two_steps_matches_trl(model_dir, tmp_path, monkeypatch, loss_type):
    # One generation batch feeds two optimizer steps: the second trains on rows that the first
    # step's update made off-policy, so both sides must use old log-probs from rollout time.
    settings = base_settings(loss_type=loss_type, per_device_train_batch_size=4, steps_per_generation=2,
                             max_steps=2, use_kernels=False)
    check_parity(model_dir, tmp_path, monkeypatch, distinct_prompts(2), settings)


@pytest.mark.parametrize("use_kernels", [False, True], ids=["reference", "kernels"])
def test_left_padded_prompts_match_trl(model_dir, tmp_path, monkeypatch, use_kernels):
    # Prompts of 6 and 4 tokens: the short one is left-padded, and TRL's implicit position ids
    # differ from atlas_fast's by that shift (see the module docstring).
    settings = base_settings(loss_type="dapo", beta=0.04, num_iterations=2, max_steps=2, use_kernels=use_kernels)
    check_parity(model_dir, tmp_path, monkeypatch, ["12+34=", "5+6="], settings)


@pytest.mark.parametrize("options", [
    dict(loss_type="grpo", mask_truncated_completions=True),
    dict(loss_type="dapo", mask_truncated_completions=True),
    dict(loss_type="grpo", scale_rewards="batch"),
    dict(loss_type="grpo", scale_rewards="none"),
    dict(loss_type="dapo", epsilon_high=0.28, delta=1.1, learning_rate=5e-3),
    dict(loss_type="grpo", importance_sampling_level="sequence"),
], ids=["mask_truncated-grpo", "mask_truncated-dapo", "scale_batch", "scale_none", "clip_higher_delta",
        "sequence_level"])
def test_options_match_trl(model_dir, tmp_path, monkeypatch, options):
    settings = base_settings(beta=0.04, num_iterations=2, max_steps=2, use_kernels=False, **options)
    check_parity(model_dir, tmp_path, monkeypatch, distinct_prompts(2), settings)


@pytest.mark.parametrize("level, use_kernels", [("token", True), ("sequence", True), ("token", False)])
def test_kl_bias_correction_matches_trl(model_dir, tmp_path, monkeypatch, level, use_kernels):
    # TRL 1.16's default: the k3 KL weighted by the importance ratio, gradient included. The
    # second step reuses the batch, so the ratio differs from 1 and the correction shows.
    settings = base_settings(loss_type="dapo", beta=0.04, num_iterations=2, max_steps=2, use_kernels=use_kernels,
                             importance_sampling_level=level, use_bias_correction_kl=True)
    check_parity(model_dir, tmp_path, monkeypatch, distinct_prompts(2), settings)
