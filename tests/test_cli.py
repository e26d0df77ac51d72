"""The `atlas-fast` command line: config composition, validation, and one end-to-end run."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from atlas_fast import cli
from atlas_fast.modeling import load_tokenizer
from atlas_fast.config import GRPOConfig
from tiny import arithmetic_rows, char_tokenizer, tiny_model

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Stand-ins for the demo assets so resolving does not depend on them being built.
LOCAL = ["model.name_or_path=/models/m", "data.train_file=/data/train.jsonl", "data.eval_file=/data/eval.jsonl"]


def resolved(*overrides: str) -> cli.RunSpec:
    cfg = cli.compose_config(list(overrides))
    return cli.resolve(OmegaConf.to_container(cfg, resolve=True))


def test_default_config_composes_every_group():
    cfg = cli.compose_config([])
    # Sections that are off unless asked for (reward_system=..., a teaching recipe) are absent.
    assert set(cfg) <= cli.TOP_LEVEL_KEYS and cli.TOP_LEVEL_KEYS - set(cfg) <= {"reward_system", "teaching"}
    assert cfg.model.name_or_path == "demo" and cfg.data.train_file == "demo"
    assert list(cfg.reward.funcs) == ["accuracy", "format"]
    assert cfg.data.split_seed == cfg.seed == 42
    spec = resolved(*LOCAL)
    assert spec.model == spec.tokenizer == "/models/m"
    assert spec.config.output_dir == "outputs/demo"
    assert spec.config.reward_weights == [1.0, 0.2]
    assert spec.evaluate_before_after and spec.resume_from_checkpoint is None


def test_demo_paths_resolve_to_the_embedded_assets(tmp_path, monkeypatch):
    from atlas_fast import demo

    for name in ("MODEL_DIR", "TRAIN_FILE", "EVAL_FILE"):
        path = tmp_path / name
        path.touch()
        monkeypatch.setattr(demo, name, path)
    spec = resolved()
    assert (spec.model, spec.train_file, spec.eval_file) == tuple(
        str(tmp_path / n) for n in ("MODEL_DIR", "TRAIN_FILE", "EVAL_FILE"))
    assert resolved("model.name_or_path=null").model == str(tmp_path / "MODEL_DIR")


def test_missing_demo_assets_are_reported(tmp_path, monkeypatch):
    from atlas_fast import demo

    monkeypatch.setattr(demo, "MODEL_DIR", tmp_path / "absent")
    with pytest.raises(cli.ConfigError, match=r"model.name_or_path=demo .*atlas_fast.demo.build"):
        resolved()


def test_trainer_yaml_mirrors_grpoconfig_defaults():
    values = OmegaConf.to_container(OmegaConf.load(CONFIGS / "trainer" / "grpo.yaml"))
    fields = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    assert set(values) <= set(fields), set(values) - set(fields)
    # Every field is settable somewhere: in the trainer group or through the group that owns it.
    assert set(values) | set(cli.ROUTED_FIELDS) == set(fields)
    for name, value in values.items():
        f = fields[name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if isinstance(default, tuple):
            value = tuple(value)
        assert value == default and type(value) is type(default), name


def test_overrides_reach_grpoconfig():
    spec = resolved(*LOCAL, "trainer.max_steps=1", "trainer.report_to=tensorboard", "seed=7",
                    "+model.model_init_kwargs.dtype=bfloat16", "trainer.num_train_epochs=2")
    c = spec.config
    assert c.max_steps == 1 and c.seed == 7 and spec.split_seed == 7
    assert c.report_to == ("tensorboard",) and c.num_train_epochs == 2.0
    assert c.model_init_kwargs == {"dtype": "bfloat16"}


def test_default_recipe_is_grpoconfig_defaults():
    c = resolved(*LOCAL, "recipe=default").config
    expected = GRPOConfig(output_dir="outputs/demo", reward_weights=[1.0, 0.2])
    assert c.to_dict() == expected.to_dict()


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (CONFIGS / "recipe").glob("*.yaml")))
def test_every_recipe_builds_a_valid_grpoconfig(recipe):
    assert isinstance(resolved(*LOCAL, f"recipe={recipe}").config, GRPOConfig)


def test_atlas_teacher_recipe():
    spec = resolved(*LOCAL, "recipe=atlas_teacher")
    c = spec.config
    assert (c.num_generations, c.learning_rate, c.beta, c.temperature) == (32, 1e-6, 0.04, 0.7)
    assert (c.max_prompt_length, c.max_completion_length, c.loss_type) == (4096, 4096, "grpo")
    assert (c.sync_ref_model, c.ref_model_sync_steps, c.ref_model_mixup_alpha) == (True, 2, 0.9)
    assert c.offload_untrained_models and c.gradient_checkpointing and c.eval_steps == 10
    assert not c.use_bias_correction_kl
    assert c.output_dir == "outputs/atlas_teacher"
    # It says what it runs here (one process, one problem per optimizer step), not ATLAS's 8-GPU run.
    assert c.per_device_train_batch_size * c.gradient_accumulation_steps == c.num_generations
    header = (CONFIGS / "recipe" / "atlas_teacher.yaml").read_text().split("output_dir:")[0]
    header = " ".join(line.lstrip("# ") for line in header.splitlines())
    assert "one process" in header and "one problem (32 completions) per optimizer step" in header
    assert "8xH100 in the original" not in header


def test_lora_model_config():
    spec = resolved(*LOCAL[1:], "model=qwen2_5_7b_lora")
    assert spec.model == "Qwen/Qwen2.5-7B-Instruct"
    lora = cli.lora_config(spec.peft)
    assert (lora.r, lora.lora_alpha, lora.target_modules) == (16, 32, "all-linear")


@pytest.mark.parametrize("override, message", [
    ("trainer.lerning_rate=1e-5", "unknown GRPOConfig field trainer.lerning_rate; did you mean trainer.learning_rate?"),
    ("+trainer.lerning_rate=1e-5", "unknown GRPOConfig field trainer.lerning_rate; did you mean trainer.learning_rate?"),
    ("+trainer.seed=1", "trainer.seed is set through seed"),
    ("outptu_dir=/tmp/x", "unknown config key outptu_dir; did you mean output_dir?"),
    ("trainer.learning_rate=abc", "trainer.learning_rate must be a number, got 'abc'"),
    ("trainer.max_steps=1.5", "trainer.max_steps must be an integer, got 1.5"),
    ("trainer.num_generations=1", "trainer.num_generations must be >= 2"),
    ("trainer.loss_type=ppo", "trainer.loss_type must be one of"),
    ("reward.weights=[1.0]", "reward.weights has 1 entries for 2 reward functions"),
    ("recipe=nope", "Could not find 'recipe/nope'"),
    ("seed=${nope}", "Interpolation key 'nope' not found"),
])
def test_bad_config_is_one_clear_line_and_exit_2(override, message, capsys):
    assert cli.main(["train", *LOCAL, override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message in err


def test_missing_mandatory_value(capsys):
    assert cli.main(["train", "data=jsonl"]) == 2
    assert capsys.readouterr().err == "error: data.train_file is required: add data.train_file=...\n"


def test_config_dir_lookup(tmp_path, monkeypatch):
    monkeypatch.delenv(cli.CONFIG_DIR_ENV, raising=False)
    assert cli.config_dir() == CONFIGS
    (tmp_path / "train.yaml").write_text("seed: 1\n")
    monkeypatch.setenv(cli.CONFIG_DIR_ENV, str(tmp_path))
    assert cli.config_dir() == tmp_path
    assert cli.config_dir(CONFIGS) == CONFIGS  # --config-dir wins over the environment
    monkeypatch.setenv(cli.CONFIG_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(cli.ConfigError, match=cli.CONFIG_DIR_ENV):
        cli.config_dir()


def test_module_entry_point_help():
    env = {**os.environ, "PYTHONPATH": str(CONFIGS.parent)}
    out = subprocess.run([sys.executable, "-m", "atlas_fast", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "train" in out.stdout


def test_no_subcommand_prints_help(capsys):
    assert cli.main([]) == 0
    assert "usage: atlas-fast" in capsys.readouterr().out


def test_print_config(capsys):
    assert cli.main(["train", "--print-config", "trainer.max_steps=3"]) == 0
    assert "max_steps: 3" in capsys.readouterr().out
    # The checks come first: a config that would not run is an error, not a printout.
    assert cli.main(["train", "--print-config", "trainer.learning_rate=abc"]) == 2
    out = capsys.readouterr()
    assert "trainer.learning_rate must be a number" in out.err and not out.out
    # ... the run's own checks too (GRPOConfig, reward and data settings, a teaching run's)
    for override, message in (("trainer.num_generations=1", "num_generations must be >= 2"),
                              ("data.eval_fraction=1.5", "data.eval_fraction must be in [0, 1)")):
        assert cli.main(["train", "--print-config", override]) == 2
        out = capsys.readouterr()
        assert message in out.err and not out.out
    assert cli.main(["train", "--print-config", "recipe=teacher_demo", "teaching.student_name_or_path=null"]) == 2
    out = capsys.readouterr()
    assert "teaching.student_name_or_path is required" in out.err and not out.out


def test_summary_line():
    acc = "eval/rewards/accuracy_reward/mean"
    assert cli.eval_metric(["format_reward", "accuracy_reward"]) == acc
    assert cli.summary_line(acc, {acc: 0.31}, {acc: 0.585}) == "held-out accuracy: 31.0% -> 58.5%"
    assert cli.summary_line(acc, None, {acc: float("nan")}) == "held-out accuracy: n/a -> n/a"
    other = cli.eval_metric(["my_reward"])
    assert cli.summary_line(other, {other: 0.25}, {other: 0.5}) == "held-out my_reward: 0.250 -> 0.500"


# ---------------------------------------------------------------------- with a real (tiny) model
@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tok = char_tokenizer()
    tiny_model(tok).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    for name, rows in (("train", arithmetic_rows(16)), ("eval", arithmetic_rows(6, seed=1))):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, tok


def test_tokenizer_loads_as_saved(tiny_run_inputs):
    # A qwen2 folder whose tokenizer is a plain tokenizers one: AutoTokenizer would rebuild it as
    # Qwen2Tokenizer (which drops the space below); the CLI must keep the saved ids.
    root, tok = tiny_run_inputs
    text = "1 + 2=<3>"
    assert load_tokenizer(str(root / "model"))(text)["input_ids"] == tok(text)["input_ids"]


def test_train_end_to_end(tiny_run_inputs, tmp_path, capsys):
    root, tok = tiny_run_inputs
    out = tmp_path / "run"
    code = cli.main([
        "train", f"model.name_or_path={root / 'model'}", "data=jsonl",
        f"data.train_file={root / 'train.jsonl'}", f"data.eval_file={root / 'eval.jsonl'}",
        "recipe=default", "trainer.max_steps=2", "trainer.num_generations=2",
        "trainer.per_device_train_batch_size=4", "trainer.max_completion_length=4",
        "trainer.disable_tqdm=true", f"output_dir={out}",
    ])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"held-out accuracy: \d+\.\d% -> \d+\.\d%", lines[-1])
    assert (out / "config.yaml").exists() and (out / "final" / "config.json").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in records if "eval/reward" in r]
    assert evals == [0, 2]  # before training and after it, both in the log
    assert load_tokenizer(str(out / "final"))("12+3=")["input_ids"] == tok("12+3=")["input_ids"]


def test_split_when_no_eval_file(tiny_run_inputs, tmp_path, capsys):
    root, _ = tiny_run_inputs
    out = tmp_path / "run"
    code = cli.main([
        "train", f"model.name_or_path={root / 'model'}", "data=jsonl", f"data.train_file={root / 'train.jsonl'}",
        "data.eval_fraction=0.25", "reward=accuracy", "recipe=default", "trainer.max_steps=1",
        "trainer.num_generations=2", "trainer.per_device_train_batch_size=2", "trainer.max_completion_length=2",
        "trainer.disable_tqdm=true", "evaluate_before_after=false", f"output_dir={out}",
    ])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "12 train prompts" in stdout and "4 eval prompts" in stdout
    assert "held-out" not in stdout and (out / "final").is_dir()


def tiny_run_args(root, out, *extra):
    return ["train", f"model.name_or_path={root / 'model'}", "data=jsonl", f"data.train_file={root / 'train.jsonl'}",
            "data.eval_file=null", "data.eval_fraction=0", "reward=accuracy", "recipe=default", "trainer.max_steps=1",
            "trainer.num_generations=2", "trainer.per_device_train_batch_size=2", "trainer.max_completion_length=2",
            "trainer.disable_tqdm=true", "trainer.save_steps=1", "evaluate_before_after=false", f"output_dir={out}",
            *extra]


@pytest.mark.parametrize("resume, message", [
    ("/nonexistent/checkpoint-3", "resume_from_checkpoint=/nonexistent/checkpoint-3: Cannot load checkpoint: "
                                  "checkpoint folder /nonexistent/checkpoint-3 does not exist"),
    ("true", "resume_from_checkpoint=True: resume_from_checkpoint=True but"),
])
def test_a_bad_resume_is_one_error_line_before_any_output(tiny_run_inputs, tmp_path, capsys, resume, message):
    root, _ = tiny_run_inputs
    assert cli.main(tiny_run_args(root, tmp_path / "run", f"resume_from_checkpoint={resume}")) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and message in captured.err
    assert "trainer:" not in captured.out  # no config dump before the error


def test_resume_and_reuse_of_an_output_dir_from_the_cli(tiny_run_inputs, tmp_path, capsys):
    root, _ = tiny_run_inputs
    out = tmp_path / "run"
    assert cli.main(tiny_run_args(root, out)) == 0
    capsys.readouterr()
    # The same command again would replace that run: refused, and nothing written.
    before = (out / "metrics.jsonl").read_text()
    assert cli.main(tiny_run_args(root, out)) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: output_dir {out} already holds a run")
    assert "trainer:" not in captured.out and (out / "metrics.jsonl").read_text() == before
    # Resuming continues it: one more step, appended to the same log.
    assert cli.main(tiny_run_args(root, out, "resume_from_checkpoint=true", "trainer.max_steps=2")) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and (out / "checkpoint-2").is_dir()
    assert cli.main(tiny_run_args(root, out, "trainer.overwrite_output_dir=true")) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.mark.parametrize("override, message", [
    ("trainer.beta=[1]", "trainer.beta"),
    ("trainer.max_steps=-5", "trainer.max_steps must be > 0, or -1"),
    ("trainer.report_to=mlflow", "report_to: unsupported integration"),
    ("+model.peft.rr=3", "unknown config key model.peft.rr"),
    ("model.peft.r=8", "model.peft.r: model.peft is null in this config; add the key with +model.peft.r=..."),
    ("reward.weights=[1,a]", "reward.weights[1] must be a number, got 'a'"),
    ("model.model_init_kwargs.dtype=bfloat16", "model.model_init_kwargs.dtype is not in the config yet: add it with +"),
    ("model=qwen2_5_7b_lora", None),
    ("trainer.eval_strategy=sometimes", "trainer.eval_strategy must be one of"),
])
def test_schema_checks(override, message, capsys):
    if message is None:  # a valid config composes and resolves
        assert resolved(*LOCAL[1:], override).peft["r"] == 16
        return
    assert cli.main(["train", *LOCAL, override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_a_data_mistake_found_by_the_trainer_is_one_error_line(tiny_run_inputs, tmp_path, capsys):
    root, _ = tiny_run_inputs
    (tmp_path / "no_answers.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+1="}) + "\n" for i in range(4)))
    args = tiny_run_args(root, tmp_path / "run")
    args[args.index(f"data.train_file={root / 'train.jsonl'}")] = f"data.train_file={tmp_path / 'no_answers.jsonl'}"
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        "error: reward function 'accuracy_reward' needs the column(s) ['ground_truth'], which the train dataset "
        "lacks (its columns: prompt)\n")
    assert "trainer:" not in captured.out and not (tmp_path / "run").exists()
