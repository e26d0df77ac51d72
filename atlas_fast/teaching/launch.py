"""`atlas-fast train` for a config with a `teaching:` section (e.g. recipe=teacher_demo).

The CLI composes and checks the config as for any run, then hands the plain values here. The
`teaching` section is a TeachingConfig (configs/teaching/*.yaml) plus `student_name_or_path` and
`student_tokenizer_name_or_path`; `reward.funcs` may name `teaching` (the teaching reward with
the section's weights) beside any other reward function. Paths written `demo:<path>` name files
under atlas_fast/demo/assets, wherever the package is installed.

The run prints the held-out numbers of the greedy protocol before and after training:
    guided accuracy: X -> Y (baseline Z)
X and Y are the student's accuracy with the teacher's guidance before and after training, Z its
accuracy alone (the student is frozen, so Z does not move).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

DEMO_PREFIX = "demo:"
STUDENT_KEYS = ("student_name_or_path", "student_tokenizer_name_or_path")


def train_teacher(values: dict, config_text: str) -> int:
    """The rest of `atlas-fast train` for a teaching run, from the checked config's plain values;
    returns the exit code (2 for a config mistake, reported as one `error:` line)."""
    from atlas_fast import cli

    try:
        spec, teaching, student = teacher_spec(values)
        cli.check_run_folder(spec)
        trainer = build_teacher_trainer(spec, teaching, student)
        cli.start(trainer, spec)
    except ValueError as err:  # ConfigError, GRPOConfig's and TeachingConfig's validation
        return cli.fail(err)
    print(config_text, end="", flush=True)
    (Path(spec.config.output_dir) / "config.yaml").write_text(config_text)
    run_teacher(trainer, spec)
    return 0


def teacher_spec(values: dict) -> tuple[Any, dict, dict]:
    """A teaching run's checked config: (RunSpec, teaching settings, student paths). Raises a
    ValueError naming the key, as `atlas-fast train` reports it (also before --print-config)."""
    from atlas_fast import cli

    from .config import TeachingConfig

    values = copy.deepcopy(values)
    teaching = dict(values.pop("teaching"))
    student = {k: teaching.pop(k, None) for k in STUDENT_KEYS}
    if not student["student_name_or_path"]:
        raise cli.ConfigError("teaching.student_name_or_path is required: the frozen student's model")
    for section, key in (("model", "name_or_path"), ("model", "tokenizer_name_or_path"), ("data", "train_file"),
                         ("data", "eval_file")):
        values[section][key] = demo_asset(values[section].get(key), f"{section}.{key}")
    student = {k: demo_asset(v, f"teaching.{k}") for k, v in student.items()}
    spec = cli.resolve(values)
    TeachingConfig.from_dict(teaching)  # its own checks, before anything loads
    return spec, teaching, student


def demo_asset(value: Any, key: str) -> Any:
    if not isinstance(value, str) or not value.startswith(DEMO_PREFIX):
        return value
    from atlas_fast import cli, demo

    path = demo.ASSETS / value[len(DEMO_PREFIX):]
    if not path.exists():
        raise cli.ConfigError(f"{key}={value}: {path} is missing; build the teacher demo's assets with: "
                              "python -m atlas_fast.demo.build_teacher")
    return str(path)


def build_teacher_trainer(spec, teaching: dict, student: dict):
    from atlas_fast.cli import blame, build_rewards, load_run_data, lora_config
    from atlas_fast.modeling import load_tokenizer

    from .config import TeachingConfig
    from .trainer import TeacherGRPOTrainer

    teaching_config = TeachingConfig.from_dict(teaching)
    train, evaluation = load_run_data(spec)
    print(f"teacher: {spec.model}\nstudent: {student['student_name_or_path']}")
    print(f"data: {len(train)} train problems ({spec.train_file}), "
          + (f"{len(evaluation)} eval problems" if evaluation is not None else "no eval set"), flush=True)
    c = spec.config
    with blame("model.name_or_path", spec.tokenizer):
        tokenizer = load_tokenizer(spec.tokenizer, c.trust_remote_code)
    student_tok_path = student["student_tokenizer_name_or_path"] or student["student_name_or_path"]
    with blame("teaching.student_name_or_path", student_tok_path):
        student_tokenizer = load_tokenizer(student_tok_path, c.trust_remote_code)
    rewards = build_rewards(spec, passthrough=("teaching",))  # the trainer builds the teaching reward
    peft = lora_config(spec.peft) if spec.peft else None
    with blame("model.name_or_path", spec.model):
        return TeacherGRPOTrainer(c, model=spec.model, ref_model=spec.ref_model, tokenizer=tokenizer,
                                  train_dataset=train, eval_dataset=evaluation, reward_funcs=rewards,
                                  peft_config=peft, student_model=student["student_name_or_path"],
                                  student_tokenizer=student_tokenizer, teaching_config=teaching_config)


def run_teacher(trainer, spec) -> None:
    out = Path(spec.config.output_dir)
    evaluate = spec.evaluate_before_after and trainer.eval_dataset is not None
    before = trainer.evaluate() if evaluate and not spec.resume_from_checkpoint else None
    trainer.train(resume_from_checkpoint=spec.resume_from_checkpoint)
    final = trainer.save_model(out / "final")
    for label, name in (("metrics", "metrics.jsonl"), ("plot", "metrics.png"), ("config", "config.yaml"),
                        ("exchanges", "teaching_exchanges.jsonl")):
        if (out / name).exists():
            print(f"{label}: {out / name}")
    print(f"final teacher: {final}")
    if evaluate:
        after = trainer.evaluate()
        print(summary_line(before, after), flush=True)


def summary_line(before: dict | None, after: dict) -> str:
    def pct(metrics: dict | None, key: str) -> str:
        return "n/a" if not metrics or key not in metrics else f"{100 * metrics[key]:.1f}%"

    baseline = pct(before or after, "eval/baseline_accuracy")
    return f"guided accuracy: {pct(before, 'eval/student_accuracy')} -> {pct(after, 'eval/student_accuracy')} (baseline {baseline})"
