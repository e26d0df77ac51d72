import re
from pathlib import Path

import pytest

from atlas_fast import GRPOConfig


def test_saved_config_reloads_unchanged():
    for cfg in (GRPOConfig(generation_batch_size=32), GRPOConfig(steps_per_generation=4), GRPOConfig()):
        again = GRPOConfig.from_dict(cfg.to_dict())
        assert again == cfg


@pytest.mark.parametrize("kwargs, steps", [
    ({}, 1),
    (dict(gradient_accumulation_steps=3, per_device_train_batch_size=8), 3),
    (dict(steps_per_generation=4), 4),
    (dict(generation_batch_size=64, per_device_train_batch_size=16), 4),
])
def test_generation_steps_resolution(kwargs, steps):
    cfg = GRPOConfig(**kwargs)
    assert cfg.generation_steps == steps
    assert cfg.prompts_per_generation * cfg.num_generations == cfg.per_device_train_batch_size * steps


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_generations=1), "num_generations"),
    (dict(per_device_train_batch_size=6), "num_generations"),
    (dict(generation_batch_size=20), "generation_batch_size"),
    (dict(steps_per_generation=2, generation_batch_size=32), "mutually exclusive"),
    (dict(loss_type="ppo"), "loss_type"),
    (dict(temperature=0.0), "temperature"),
    (dict(scale_rewards="global"), "scale_rewards"),
    (dict(max_steps=0), "max_steps"),
    (dict(lr_scheduler_type="step"), "lr_scheduler_type"),
    (dict(save_total_limit=0), "save_total_limit"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GRPOConfig(**kwargs)


def test_unknown_field_is_named():
    with pytest.raises(ValueError, match="num_gens"):
        GRPOConfig.from_dict({"num_gens": 4})


def test_old_logps_needed_only_off_policy():
    assert not GRPOConfig().uses_old_logps
    assert GRPOConfig(num_iterations=2).uses_old_logps
    assert GRPOConfig(steps_per_generation=2).uses_old_logps


# ---------------------------------------------------------------------- a TRL user's config
def trl_config(**kwargs):
    import warnings

    trl = pytest.importorskip("trl")
    with warnings.catch_warnings():  # transformers 5 deprecation notes about its own field names
        warnings.simplefilter("ignore")
        return trl.GRPOConfig(output_dir="/tmp/trl-out", bf16=False, use_cpu=True, **kwargs)


def test_a_trl_config_dict_is_accepted_and_honoured():
    trl_cfg = trl_config(learning_rate=3e-6, beta=0.04, num_generations=4, per_device_train_batch_size=8,
                         gradient_accumulation_steps=2, warmup_steps=5, lr_scheduler_type="cosine",
                         lr_scheduler_kwargs={"num_cycles": 0.25}, optim="adamw_torch", save_strategy="steps",
                         save_steps=50, eval_strategy="steps", eval_steps=25, logging_strategy="steps",
                         logging_steps=5, gradient_checkpointing=True,
                         gradient_checkpointing_kwargs={"use_reentrant": False},
                         generation_kwargs={"no_repeat_ngram_size": 3}, max_steps=100, report_to="none",
                         loss_type="grpo", epsilon_high=0.28, data_seed=7)
    cfg = GRPOConfig(**trl_cfg.to_dict())
    honoured = ["learning_rate", "beta", "num_generations", "per_device_train_batch_size", "gradient_accumulation_steps",
                "warmup_steps", "lr_scheduler_type", "lr_scheduler_kwargs", "optim", "save_strategy", "save_steps",
                "eval_strategy", "eval_steps", "logging_strategy", "logging_steps", "gradient_checkpointing",
                "gradient_checkpointing_kwargs", "generation_kwargs", "max_steps", "loss_type", "epsilon_high",
                "seed", "data_seed", "temperature", "top_p", "max_completion_length", "num_iterations", "epsilon",
                "scale_rewards", "importance_sampling_level", "use_bias_correction_kl", "mask_truncated_completions",
                "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps", "bf16", "fp16", "max_grad_norm",
                "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "num_train_epochs", "use_cpu", "output_dir"]
    for name in honoured:
        assert getattr(cfg, name) == getattr(trl_cfg, name), name
    assert cfg.report_to == () and cfg.generation_steps == trl_cfg.steps_per_generation == 2


def test_every_trl_field_is_honoured_or_a_checked_no_op():
    import dataclasses

    from atlas_fast.config import ALIASES, NOOP_FIELDS

    trl_fields = {f.name for f in dataclasses.fields(type(trl_config()))}
    ours = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert trl_fields - ours - set(ALIASES) - set(NOOP_FIELDS) == set()


def _other_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 7
    if isinstance(value, dict):
        return {**value, "x": 1}
    if isinstance(value, list):
        return ["x"]
    return "something-else"


def test_a_non_default_value_of_an_unimplemented_trl_field_is_refused_by_name():
    from atlas_fast.config import NOOP_FIELDS

    for name, accepted in NOOP_FIELDS.items():
        GRPOConfig(**{name: accepted[0]})  # TRL's default: a no-op
        if _other_value(accepted[0]) in accepted:
            continue  # either value is harmless (e.g. dataloader_pin_memory)
        with pytest.raises(ValueError) as err:
            GRPOConfig(**{name: _other_value(accepted[0])})
        message = str(err.value)
        assert message.startswith(f"{name}=") and "not supported" in message and "\n" not in message, message


def test_a_refusal_says_what_to_use_instead():
    with pytest.raises(ValueError, match="use_liger_kernel=True is not supported.*use_kernels=True"):
        GRPOConfig(**trl_config(use_liger_kernel=True).to_dict())
    with pytest.raises(ValueError, match="optim must be one of.*optimizers="):
        GRPOConfig(optim="adafactor")


@pytest.mark.parametrize("kwargs, message", [
    (dict(learning_rate="abc"), "learning_rate must be a number, got 'abc'"),
    (dict(beta="0.1"), "beta must be a number, got '0.1'"),
    (dict(max_steps=-5), "max_steps must be > 0, or -1"),
    (dict(max_steps=2.0), "max_steps must be an integer"),
    (dict(num_generations=True), "num_generations must be an integer"),
    (dict(gradient_checkpointing="yes"), "gradient_checkpointing must be True or False"),
    (dict(reward_weights=[1, "a"]), "reward_weights must be a list of a number"),
    (dict(report_to="mlflow"), "report_to: unsupported integration"),
    (dict(save_strategy="best"), "save_strategy must be one of"),
    (dict(eval_steps=10), "eval_steps=10 has no effect with eval_strategy='no'"),
    (dict(warmup_steps=1.5), "warmup_steps must be a whole number"),
    (dict(bf16=True, fp16=True), "bf16 and fp16 are mutually exclusive"),
    (dict(use_vllm=True, vllm_mode="remote"), "vllm_mode must be one of"),
    (dict(packed_attention="flash"), "packed_attention must be one of"),
    (dict(max_grad_norm=float("nan")), "max_grad_norm must be a number"),
    (dict(gradient_checkpointing_kwargs={"use_reentrant": True}), "gradient_checkpointing_kwargs"),
])
def test_types_and_ranges_are_checked_on_construction(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        GRPOConfig(**kwargs)


def test_unknown_keywords_are_a_named_error_not_a_type_error():
    with pytest.raises(ValueError, match=r"unknown GRPOConfig field 'num_gens'; did you mean num_generations\?"):
        GRPOConfig(num_gens=4)


@pytest.mark.parametrize("mode, backend", [("server", "vllm_server"), ("colocate", "vllm")])
def test_use_vllm_picks_the_rollout_backend(mode, backend):
    cfg = GRPOConfig(**trl_config(use_vllm=True, vllm_mode=mode).to_dict())
    assert cfg.rollout_backend == backend
    assert GRPOConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="use_vllm=True .* rollout_backend='engine'"):
        GRPOConfig(use_vllm=True, vllm_mode=mode, rollout_backend="engine")


def test_activation_checkpointing_is_the_same_switch():
    assert GRPOConfig(activation_checkpointing=True).gradient_checkpointing
    with pytest.raises(ValueError, match="disagree"):
        GRPOConfig(activation_checkpointing=True, gradient_checkpointing=False)


def test_the_readme_trainer_snippet_runs_as_written(monkeypatch):
    """Every name it uses is defined, and its GRPOConfig is valid (the trainer is stood in for)."""
    import atlas_fast

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## The trainer"):]
    code = section[section.index("```python") + len("```python"): section.index("```", section.index("```python") + 9)]
    seen = {}

    class StandIn:
        def __init__(self, config, **kwargs):
            assert isinstance(config, GRPOConfig)
            assert all(callable(f) for f in kwargs["reward_funcs"])
            seen.update(kwargs)

        def train(self, **kwargs):
            seen["trained"] = True

    monkeypatch.setattr(atlas_fast, "GRPOTrainer", StandIn, raising=False)
    exec(compile(code, "README.md", "exec"), {})
    assert seen["trained"]
