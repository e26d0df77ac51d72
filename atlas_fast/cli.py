"""The `atlas-fast` command line.

    atlas-fast train [--config-dir DIR] [--print-config] [OVERRIDE ...]

`train` composes the Hydra configs in `configs/` (train.yaml and its groups) with the given
overrides, e.g. `trainer.max_steps=20 output_dir=/tmp/run model=qwen2_5_0_5b`. With no overrides
it trains the embedded demo. The composed tree is checked against an OmegaConf structured schema
(`RunSchema`: every key, and the type of every value) and resolved once, here, into plain
arguments (a GRPOConfig, paths, reward names); nothing below this module sees the config tree.
Every config or data mistake, up to a checkpoint that cannot be resumed, ends the command with one
`error:` line and exit code 2, before anything is printed or written.

Hydra's Compose API is used rather than `@hydra.main`, which would take over argv, the working
directory and logging, and leave no room for other subcommands.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

if TYPE_CHECKING:  # imported where used: `atlas-fast --help` should not pay for torch and triton
    from .config import GRPOConfig

CONFIG_DIR_ENV = "ATLAS_FAST_CONFIG_DIR"
CONFIG_NAME = "train"
EXIT_CONFIG_ERROR = 2  # argparse's code for a bad command line; a bad config is the same kind of mistake

# GRPOConfig fields that other config groups own, so each value is set in exactly one place.
ROUTED_FIELDS = {
    "output_dir": "output_dir",
    "seed": "seed",
    "trust_remote_code": "model.trust_remote_code",
    "model_init_kwargs": "model.model_init_kwargs",
    "reward_weights": "reward.weights",
}
DEMO = "demo"  # a path value that stands for the embedded demo's file
MISSING = "???"  # OmegaConf's mark for a value the config must set
ACCURACY_METRIC = "eval/rewards/accuracy_reward/mean"


class ConfigError(ValueError):
    """A config value the run cannot use; the message names the key."""


# ---------------------------------------------------------------------- the schema
# Keys and value types of the composed config; OmegaConf checks them on merge. A key that a
# config may leave "???" (required) has no default here: merging "???" keeps a default. The trainer
# section is GRPOConfig's fields (less those other sections own), generated below, so the two
# cannot drift; GRPOConfig then checks ranges and combinations.
@dataclass
class PeftSchema:
    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: Any = "all-linear"  # "all-linear" or a list of module names


@dataclass
class ModelSchema:
    name_or_path: Optional[str] = MISSING
    ref_name_or_path: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    trust_remote_code: bool = False
    model_init_kwargs: Dict[str, Any] = field(default_factory=dict)
    peft: Optional[PeftSchema] = None


@dataclass
class DataSchema:
    train_file: str = MISSING
    eval_file: Optional[str] = None
    eval_fraction: float = 0.0
    split_seed: Optional[int] = None


@dataclass
class RewardSchema:
    funcs: List[Any] = field(default_factory=list)
    weights: Optional[List[float]] = None
    reward_model: Optional[str] = None


@functools.lru_cache(maxsize=None)
def trainer_schema() -> type:
    from .config import GRPOConfig

    hints = typing.get_type_hints(GRPOConfig)
    fields = []
    for f in dataclasses.fields(GRPOConfig):
        if f.name in ROUTED_FIELDS:
            continue
        default = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
        spec = field(default=default) if default is not dataclasses.MISSING else field(default_factory=f.default_factory)
        fields.append((f.name, omegaconf_type(hints[f.name]), spec))
    return dataclasses.make_dataclass("trainer", fields)


def omegaconf_type(hint: Any) -> Any:
    """The annotation as OmegaConf can check it; what it cannot express is left to GRPOConfig."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and type(None) in args:
            inner = omegaconf_type(rest[0])
            return Any if inner is Any else Optional[inner]
        return Any
    if hint in (int, float, bool, str):
        return hint
    if hint is dict or origin is dict:
        return Dict[str, Any]
    if origin is list and args and args[0] in (int, float, bool, str):
        return List[args[0]]
    return Any


@functools.lru_cache(maxsize=None)
def run_schema() -> type:
    """The whole tree: one field per top-level key of train.yaml."""
    return dataclasses.make_dataclass("config", [
        ("model", ModelSchema, field(default_factory=ModelSchema)),
        ("data", DataSchema, field(default_factory=DataSchema)),
        ("trainer", trainer_schema(), field(default_factory=trainer_schema())),
        ("reward", RewardSchema, field(default_factory=RewardSchema)),
        # reward_system/ (RIM's judges): checked by its own schema, atlas_fast.rewards.rim.config.
        ("reward_system", Optional[Dict[str, Any]], field(default=None)),
        ("output_dir", str, field(default=MISSING)),
        ("seed", int, field(default=42)),
        ("resume_from_checkpoint", Any, field(default=None)),  # null, true or a checkpoint path
        ("evaluate_before_after", bool, field(default=True)),
        # The teacher-student protocol (recipe=teacher_demo); TeachingConfig checks its keys.
        ("teaching", Optional[Dict[str, Any]], field(default=None)),
    ])


TOP_LEVEL_KEYS = {f.name for f in dataclasses.fields(run_schema())}


# ---------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atlas-fast", description="A lean GRPO trainer.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train with GRPO (no overrides: the embedded demo)",
        description="Compose configs/train.yaml with Hydra overrides and train.",
        epilog="examples:\n  atlas-fast train\n  atlas-fast train trainer.max_steps=20 output_dir=/tmp/run\n"
               "  atlas-fast train model=qwen2_5_0_5b data=jsonl data.train_file=train.jsonl recipe=default",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                       help="Hydra overrides: key=value, group=option, +new.key=value, ~key")
    train.add_argument("--config-dir", type=Path, default=None,
                       help=f"config folder holding {CONFIG_NAME}.yaml (default: ${CONFIG_DIR_ENV}, "
                            "else the configs/ folder beside the package)")
    train.add_argument("--print-config", action="store_true", help="print the composed config and exit")
    train.set_defaults(run=train_command)

    from .cli_rollout import add_commands  # generate, vllm-serve

    add_commands(commands)
    return parser


def train_command(args: argparse.Namespace) -> int:
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose_config(args.overrides, args.config_dir)
        cfg = checked(cfg)
        values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # "???" left unset
        if args.print_config:  # after the checks: what is printed is a config that would run
            if values.get("teaching") is not None:
                from .teaching.launch import teacher_spec

                teacher_spec(values)
            else:
                resolve(values)
            print(OmegaConf.to_yaml(cfg, resolve=True), end="")
            return 0
        if values.get("teaching") is not None:  # a teacher trained to guide a frozen student
            from .teaching.launch import train_teacher

            return train_teacher(values, OmegaConf.to_yaml(cfg, resolve=True))
        spec = resolve(values)
        check_run_folder(spec)
        trainer, final_eval = build_trainer(spec)
        start(trainer, spec)
    except (HydraException, OmegaConfBaseException, ValueError) as err:  # ConfigError is a ValueError
        return fail(err)
    text = OmegaConf.to_yaml(cfg, resolve=True)
    print(text, end="", flush=True)
    (Path(spec.config.output_dir) / "config.yaml").write_text(text)
    run(trainer, spec, final_eval)
    return 0


def checked(cfg):
    """`cfg` merged into the schema: an unknown key or a value of the wrong type raises,
    naming the key. Interpolations stay unresolved (and are checked when resolved)."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(OmegaConf.structured(run_schema()), cfg)


def check_run_folder(spec: RunSpec) -> None:
    """The output folder and the checkpoint to resume, checked before the model loads."""
    from . import checkpoint as ckpt

    c = spec.config
    try:
        ckpt.check_output_dir(c.output_dir, resuming=bool(spec.resume_from_checkpoint), overwrite=c.overwrite_output_dir)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if spec.resume_from_checkpoint:
        with blame("resume_from_checkpoint", spec.resume_from_checkpoint):
            ckpt.resume_target(c.output_dir, spec.resume_from_checkpoint)


def start(trainer, spec: RunSpec) -> None:
    """Checks that need the built trainer: the output folder may be written to, and the
    checkpoint to resume from exists, is complete and fits the model."""
    with blame("output_dir", spec.config.output_dir):
        trainer.claim_output_dir(resuming=bool(spec.resume_from_checkpoint))
    if spec.resume_from_checkpoint:
        with blame("resume_from_checkpoint", spec.resume_from_checkpoint):
            trainer.checkpoint_to_resume(spec.resume_from_checkpoint)


def fail(err: Exception) -> int:
    print(f"error: {explain(err)}", file=sys.stderr)
    return EXIT_CONFIG_ERROR


def explain(err: Exception) -> str:
    """One line naming the offending key. Hydra answers a mistyped key with "Could not override
    'trainer.lerning_rate'. To append to your config use +trainer.lerning_rate=..." - advice
    that would only move the typo along - so that case gets a did-you-mean instead."""
    from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

    cause = err if getattr(err, "full_key", None) else err.__cause__
    full_key = str(getattr(cause, "full_key", "") or "")
    if full_key and (isinstance(cause, ConfigKeyError) or "not in struct" in str(cause)):
        parent, _, leaf = full_key.rpartition(".")
        allowed = section_keys().get(parent)
        if allowed is not None and leaf in allowed:  # a known key under a section that is null here
            return (f"{full_key}: {parent} is null in this config; add the key with +{full_key}=... "
                    f"(or pick a {parent.split('.')[0]} config that has {parent})")
        if allowed is not None:
            return unknown_key_message(leaf, allowed, f"{parent}." if parent else "")
        if "not in struct" in str(cause):  # a free-form mapping (model_init_kwargs, ...): new keys take a +
            return f"{full_key} is not in the config yet: add it with +{full_key}=..."
    if isinstance(err, MissingMandatoryValue):
        return f"{err.full_key} is required: add {err.full_key}=..."
    if isinstance(cause, ValidationError) and full_key and "could not be converted" in str(cause):
        return f"{full_key} must be {describe(hint_of(full_key))}, got {cause.value!r}"
    if full_key:  # OmegaConf appends "full_key: ... object_type=..." lines
        return f"{full_key}: {str(cause).splitlines()[0]}"
    message = str(err).split("Config search path:")[0]  # Hydra appends its search path: noise here
    return " ".join(message.split())  # Hydra's messages span lines; keep one


# ---------------------------------------------------------------------- composing
def config_dir(explicit: Path | None = None) -> Path:
    """The folder holding train.yaml: --config-dir, else $ATLAS_FAST_CONFIG_DIR, else the
    repository's configs/ (editable install from a checkout), else the copy installed with the
    package (setup.py ships configs/ as atlas_fast/configs)."""
    here = Path(__file__).resolve().parent
    candidates = [("--config-dir", explicit), (CONFIG_DIR_ENV, os.environ.get(CONFIG_DIR_ENV) or None),
                  ("the source checkout", here.parent / "configs"), ("the installed package", here / "configs")]
    for origin, path in candidates:
        if path is None:
            continue
        path = Path(path).expanduser().resolve()
        if (path / f"{CONFIG_NAME}.yaml").is_file():
            return path
        if origin in ("--config-dir", CONFIG_DIR_ENV):  # an explicit choice that is wrong must not fall through
            raise ConfigError(f"{origin}: {path} holds no {CONFIG_NAME}.yaml")
    raise ConfigError(f"cannot find the configs folder ({CONFIG_NAME}.yaml); pass --config-dir or set {CONFIG_DIR_ENV}")


def compose_config(overrides: list[str] = (), directory: Path | None = None):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir(directory)), version_base=None, job_name="atlas-fast"):
        return compose(CONFIG_NAME, overrides=list(overrides))


# ---------------------------------------------------------------------- resolving
@dataclass
class RunSpec:
    """Everything a run needs, as plain values: the single product of the config tree."""

    config: GRPOConfig
    model: str
    ref_model: str | None
    tokenizer: str
    peft: dict | None
    train_file: str
    eval_file: str | None
    eval_fraction: float
    split_seed: int
    reward_funcs: list
    reward_model: str | None
    evaluate_before_after: bool
    resume_from_checkpoint: str | bool | None
    reward_system: dict | None = None  # RIMReward's config, scored after the other rewards


def resolve(cfg: dict) -> RunSpec:
    """The composed config (a plain dict) -> RunSpec. Raises ConfigError / ValueError naming the key."""
    model, data, reward, trainer = (cfg[name] for name in ("model", "data", "reward", "trainer"))

    funcs = list(reward.get("funcs") or [])
    reward_model = reward.get("reward_model")
    weights = reward.get("weights")
    n_funcs = len(funcs) + (reward_model is not None)
    reward_system = cfg.get("reward_system")
    if n_funcs == 0 and reward_system is None:
        raise ConfigError("reward.funcs is empty and reward.reward_model is null: nothing scores the completions")
    if weights is not None and len(weights) != n_funcs:
        raise ConfigError(f"reward.weights has {len(weights)} entries for {n_funcs} reward functions "
                          "(reward.funcs, then reward.reward_model)")
    if reward_system is not None:
        from .rewards.rim import load_rim_config

        rim_weight = load_rim_config(reward_system).weight  # errors name reward_system.<key>
        if weights is not None or rim_weight != 1.0:
            weights = [*(weights if weights is not None else [1.0] * n_funcs), rim_weight]

    values = {**trainer, "output_dir": str(cfg["output_dir"]), "seed": cfg["seed"],
              "trust_remote_code": bool(model.get("trust_remote_code", False)),
              "model_init_kwargs": dict(model.get("model_init_kwargs") or {}), "reward_weights": weights}
    config = grpo_config(values)

    peft = model.get("peft")
    model_path = demo_path(model.get("name_or_path"), "model.name_or_path", "MODEL_DIR", allow_null=True)
    resume = cfg.get("resume_from_checkpoint")
    if not isinstance(resume, (str, bool, type(None))) or resume == "":
        raise ConfigError(f"resume_from_checkpoint must be null, true or a checkpoint path, got {resume!r}")
    eval_fraction = data["eval_fraction"]
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}")
    return RunSpec(
        config=config,
        model=model_path,
        ref_model=model.get("ref_name_or_path"),
        tokenizer=model.get("tokenizer_name_or_path") or model_path,
        peft=peft,
        train_file=demo_path(data.get("train_file"), "data.train_file", "TRAIN_FILE"),
        eval_file=demo_path(data["eval_file"], "data.eval_file", "EVAL_FILE") if data.get("eval_file") else None,
        eval_fraction=eval_fraction,
        split_seed=data["split_seed"] if data["split_seed"] is not None else config.seed,
        reward_funcs=funcs,
        reward_model=reward_model,
        evaluate_before_after=bool(cfg.get("evaluate_before_after", True)),
        resume_from_checkpoint=resume,
        reward_system=reward_system,
    )


def grpo_config(values: dict) -> GRPOConfig:
    from .config import GRPOConfig

    try:
        return GRPOConfig(**values)
    except ValueError as err:
        # GRPOConfig's messages start with the field's bare name; give it the key users type.
        first = str(err).split()[0]
        key = ROUTED_FIELDS.get(first, f"trainer.{first}")
        raise ConfigError(f"{key}{str(err)[len(first):]}" if first in values else f"trainer: {err}") from err


def unknown_key_message(key: str, allowed: set[str], prefix: str) -> str:
    if prefix == "trainer." and key in ROUTED_FIELDS:
        return f"trainer.{key} is set through {ROUTED_FIELDS[key]}, not the trainer group"
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    hint = f"; did you mean {prefix}{close[0]}?" if close else ""
    kind = "GRPOConfig field" if prefix == "trainer." else "config key"
    return f"unknown {kind} {prefix}{key}{hint}"


def section_keys() -> dict[str, set[str]]:
    """The keys each part of the config may hold ("" is the top level), from the schema."""
    out, todo = {}, [("", run_schema())]
    while todo:
        prefix, schema = todo.pop()
        hints = typing.get_type_hints(schema)
        out[prefix] = set(hints)
        for name, hint in hints.items():
            inner = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), hint)
            if dataclasses.is_dataclass(inner):
                todo.append((f"{prefix}.{name}".lstrip("."), inner))
    return out


def hint_of(full_key: str) -> Any:
    """The schema's annotation of a dotted key (Any when there is none)."""
    hint: Any = run_schema()
    for part in full_key.split("."):
        name, index = part.partition("[")[::2]  # "weights[1]": an element of the list field weights
        inner = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), hint)
        if not dataclasses.is_dataclass(inner):
            return Any
        hint = typing.get_type_hints(inner).get(name, Any)
        if index:
            lists = [a for a in (hint, *typing.get_args(hint)) if typing.get_origin(a) in (list, List)]
            hint = typing.get_args(lists[0])[0] if lists and typing.get_args(lists[0]) else Any
    return hint


def describe(hint: Any) -> str:
    args = typing.get_args(hint)
    if type(None) in args:
        return " or ".join([describe(a) for a in args if a is not type(None)] + ["null"])
    if typing.get_origin(hint) in (list, List):
        return f"a list of {describe(args[0])}" if args else "a list"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, "a mapping" if typing.get_origin(hint) in (dict, Dict) else "a value of another type")


def demo_path(value: Any, key: str, demo_attr: str, allow_null: bool = False) -> str:
    """A path or hub id; `demo` (and null where allowed) stands for the embedded demo's asset."""
    if value == DEMO or (value is None and allow_null):
        from . import demo

        path = Path(getattr(demo, demo_attr))
        if not path.exists():
            raise ConfigError(f"{key}=demo but the demo assets are missing ({path}); "
                              "build them with: python -m atlas_fast.demo.build")
        return str(path)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a path (or 'demo'), got {value!r}")
    return value


# ---------------------------------------------------------------------- building
def load_run_data(spec: RunSpec):
    """The run's train and eval datasets; without an eval file, the eval set is split off the train set."""
    from .data import load_dataset_any, train_eval_split

    with blame("data.train_file", spec.train_file):
        train = load_dataset_any(spec.train_file)
    if spec.eval_file is not None:
        with blame("data.eval_file", spec.eval_file):
            return train, load_dataset_any(spec.eval_file)
    with blame("data.eval_fraction", spec.eval_fraction):
        return train_eval_split(train, spec.eval_fraction, seed=spec.split_seed)


def build_rewards(spec: RunSpec, passthrough: tuple[str, ...] = ()) -> list:
    """The run's reward functions in weight order: reward.funcs, reward.reward_model, then RIM's judges
    (reward_system). Names in `passthrough` stay names, for a trainer that builds them itself."""
    from .rewards import resolve_reward_func

    rewards = []
    for key, item in [(f"reward.funcs[{i}]", f) for i, f in enumerate(spec.reward_funcs)] + (
            [("reward.reward_model", spec.reward_model)] if spec.reward_model is not None else []):
        with blame(key, item):
            rewards.append(item if item in passthrough else resolve_reward_func(item)[1])
    if spec.reward_system is not None:
        from .rewards.rim import RIMReward

        try:
            rewards.append(RIMReward(spec.reward_system))
        except ValueError as err:  # e.g. the API key's environment variable is unset
            raise ConfigError(str(err)) from err
    return rewards


def build_trainer(spec: RunSpec):
    """Load data, tokenizer and rewards and construct the trainer (which loads the model).
    Loading errors are re-raised as ConfigError naming the key whose value failed."""
    from .modeling import load_tokenizer
    from .trainer import GRPOTrainer, check_reward_columns

    train, evaluation = load_run_data(spec)
    print(f"model: {spec.model}")
    print(f"data: {len(train)} train prompts ({spec.train_file}), "
          + (f"{len(evaluation)} eval prompts" if evaluation is not None else "no eval set"), flush=True)
    if spec.ref_model is not None and spec.config.beta == 0.0:
        print("note: model.ref_name_or_path is unused because trainer.beta is 0 (no KL term)")

    c = spec.config
    tokenizer_key = "model.name_or_path" if spec.tokenizer == spec.model else "model.tokenizer_name_or_path"
    with blame(tokenizer_key, spec.tokenizer):
        tokenizer = load_tokenizer(spec.tokenizer, c.trust_remote_code)
    rewards = build_rewards(spec)
    for label, dataset in (("train", train), ("eval", evaluation)):  # before the model loads
        check_reward_columns([(getattr(f, "__name__", type(f).__name__), f) for f in rewards], dataset, label)

    final_eval = FinalEvaluation() if evaluation is not None and spec.evaluate_before_after else None
    # Only the model's loading errors (OSError) are blamed on model.name_or_path: the trainer's own
    # ValueErrors (datasets, rewards, config) name what they are about.
    with blame("model.name_or_path", spec.model, kinds=(OSError,)):
        trainer = GRPOTrainer(
            c,
            model=spec.model,
            ref_model=spec.ref_model,
            tokenizer=tokenizer,
            train_dataset=train,
            eval_dataset=evaluation,
            reward_funcs=rewards,
            callbacks=[final_eval] if final_eval else None,
            peft_config=lora_config(spec.peft) if spec.peft else None,
        )
    if final_eval:
        final_eval.trainer = trainer
    return trainer, final_eval


@contextlib.contextmanager
def blame(key: str, value: Any, kinds: tuple = (ValueError, OSError)):
    try:
        yield
    except ConfigError:
        raise
    except kinds as err:
        raise ConfigError(f"{key}={value}: {err}") from err


def lora_config(peft: dict):
    try:
        from peft import LoraConfig
    except ImportError as err:
        raise ConfigError("model.peft needs the peft package (pip install peft)") from err
    target = peft.get("target_modules", "all-linear")
    return LoraConfig(r=peft.get("r", 16), lora_alpha=peft.get("alpha", 32), lora_dropout=peft.get("dropout", 0.0),
                      target_modules=list(target) if isinstance(target, (list, tuple)) else target,
                      task_type="CAUSAL_LM")


class FinalEvaluation:
    """Evaluates as training ends, before the trainer draws metrics.png, so the final numbers
    are recorded and plotted like every other evaluation. An evaluation the
    trainer already ran at the last step (eval_steps dividing max_steps) is reused."""

    def __init__(self) -> None:
        self.trainer = None
        self.metrics: dict | None = None

    def on_train_end(self, args, state, control, **kwargs) -> None:
        last = state.log_history[-1] if state.log_history else {}
        if last.get("step") == state.global_step and any(k.startswith("eval/") for k in last):
            self.metrics = {k: v for k, v in last.items() if k.startswith("eval/")}
        else:
            self.metrics = self.trainer.evaluate()


# ---------------------------------------------------------------------- running
def run(trainer, spec: RunSpec, final_eval: FinalEvaluation | None) -> None:
    out = Path(spec.config.output_dir)
    metric = eval_metric([name for name, _ in trainer.reward_funcs])
    # A resumed run's starting weights are not the base model's: skip the "before" number.
    before = trainer.evaluate() if final_eval and not spec.resume_from_checkpoint else None
    trainer.train(resume_from_checkpoint=spec.resume_from_checkpoint)
    final = trainer.save_model(out / "final")

    for label, path in (("metrics", out / "metrics.jsonl"), ("plot", out / "metrics.png"), ("config", out / "config.yaml")):
        if path.exists():
            print(f"{label}: {path}")
    print(f"final model: {final}")
    if final_eval is not None:
        after = final_eval.metrics or trainer.evaluate()
        print(summary_line(metric, before, after), flush=True)


def eval_metric(reward_names: list[str]) -> str:
    """The headline metric: held-out accuracy when the accuracy reward is used, else the first
    reward's mean."""
    if ACCURACY_METRIC in {f"eval/rewards/{n}/mean" for n in reward_names}:
        return ACCURACY_METRIC
    return f"eval/rewards/{reward_names[0]}/mean"


def summary_line(metric: str, before: dict | None, after: dict) -> str:
    if metric == ACCURACY_METRIC:
        label, fmt = "accuracy", lambda v: f"{100 * v:.1f}%"
    else:
        label, fmt = metric.split("/")[2], lambda v: f"{v:.3f}"

    def show(metrics: dict | None) -> str:
        value = None if metrics is None else metrics.get(metric)
        return "n/a" if value is None or not math.isfinite(value) else fmt(value)

    return f"held-out {label}: {show(before)} -> {show(after)}"
