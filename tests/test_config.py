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
    (dict(steps_per_generation=2, generation_batch_size=16), "mutually exclusive"),
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
