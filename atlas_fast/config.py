"""GRPOConfig: every knob of a GRPO run, validated once, with TRL's names and meanings.

Where TRL and ATLAS disagree on a default we follow TRL 1.x, which is what most users run
today, and the ATLAS recipes in configs/recipe/ set ATLAS's values explicitly:
- beta = 0.0 (TRL) rather than 0.04 (ATLAS): no reference model is loaded unless asked for,
  which saves a full model copy and a forward pass per step.
- loss_type = "dapo" (TRL) rather than ATLAS's per-sequence mean ("grpo"): token-level
  normalisation does not favour short completions.
- gradient_checkpointing = False (TRL says True): it costs ~30% more compute; turn it on when
  activations do not fit, as the large recipes do.
- use_bias_correction_kl = True (TRL 1.16): the KL term is weighted by the importance ratio;
  ATLAS's plain k3 is `use_bias_correction_kl=False` (the atlas_teacher recipe sets it).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from atlas_kernels._validation import IS_LEVELS, LOSS_TYPES, SCALES

from .rollout import BACKENDS as ROLLOUT_BACKENDS

LR_SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")


@dataclass
class GRPOConfig:
    # -- run ------------------------------------------------------------------------------
    output_dir: str = "outputs/grpo"
    run_name: str | None = None
    seed: int = 42
    max_steps: int = -1  # > 0 overrides num_train_epochs
    num_train_epochs: float = 1.0
    report_to: tuple[str, ...] = ("jsonl",)  # also "tensorboard", "wandb"
    disable_tqdm: bool = False
    # -- batch geometry (TRL semantics: batch sizes count completions, not prompts) ------
    num_generations: int = 8
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    steps_per_generation: int | None = None  # default: gradient_accumulation_steps
    generation_batch_size: int | None = None  # exclusive with steps_per_generation
    num_iterations: int = 1  # mu: optimizer passes over each generation batch
    shuffle_dataset: bool = True
    # -- sampling -------------------------------------------------------------------------
    max_prompt_length: int | None = 512
    max_completion_length: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float | None = None
    repetition_penalty: float = 1.0
    rollout_backend: str = "hf"  # atlas_fast.rollout: hf, engine, vllm_server, vllm
    rollout_func: Any = None  # callable or "module:function"; replaces generation
    # -- objective --------------------------------------------------------------------------
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    scale_rewards: str = "group"
    reward_weights: list[float] | None = None
    mask_truncated_completions: bool = False
    use_bias_correction_kl: bool = True  # TRL 1.16: weight the KL by the importance ratio
    use_kernels: bool = True  # False runs atlas_kernels.reference (for A/B checks)
    # -- optimisation -----------------------------------------------------------------------
    learning_rate: float = 1e-6
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    bf16: bool | None = None  # None: autocast to bf16 when a CUDA GPU supports it
    gradient_checkpointing: bool = False
    # -- reference model --------------------------------------------------------------------
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    offload_untrained_models: bool = False  # ATLAS: keep reference/reward models on CPU
    # -- logging, evaluation, checkpoints ------------------------------------------------
    logging_steps: int = 1
    log_entropy: bool = True  # TRL's `entropy` metric, from the loss's own sweep (+~20% on its forward)
    log_completions: bool = False
    eval_steps: int | None = None
    per_device_eval_batch_size: int = 16
    eval_max_samples: int | None = None
    save_steps: int | None = None
    save_total_limit: int | None = None
    # -- models ----------------------------------------------------------------------------
    trust_remote_code: bool = False
    model_init_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):
            self.report_to = (self.report_to,)
        self.report_to = tuple(self.report_to)
        if self.steps_per_generation is not None and self.generation_batch_size is not None:
            raise ValueError("steps_per_generation and generation_batch_size are mutually exclusive: set one")
        if self.generation_batch_size is not None and self.generation_batch_size % self.per_device_train_batch_size:
            raise ValueError(
                f"generation_batch_size ({self.generation_batch_size}) must be a multiple of "
                f"per_device_train_batch_size ({self.per_device_train_batch_size})"
            )
        self.validate()

    # The fields keep what the user wrote (a saved config reloads unchanged); this resolves them.
    @property
    def generation_steps(self) -> int:
        """Micro-batches per generation batch."""
        if self.generation_batch_size is not None:
            return self.generation_batch_size // self.per_device_train_batch_size
        if self.steps_per_generation is not None:
            return self.steps_per_generation
        return self.gradient_accumulation_steps

    # A single place that knows every rule; errors name the field and the value.
    def validate(self, world_size: int = 1) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(self.num_generations >= 2, f"num_generations must be >= 2 (GRPO compares completions within a group), got {self.num_generations}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps",
                     "num_iterations", "max_completion_length", "logging_steps", "per_device_eval_batch_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, f"{name} must be a positive integer, got {value!r}")
        for name in ("steps_per_generation", "generation_batch_size"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, int) and value >= 1), f"{name} must be a positive integer or None, got {value!r}")
        gen_batch = self.per_device_train_batch_size * self.generation_steps * world_size
        need(
            gen_batch % self.num_generations == 0,
            f"the generation batch (per_device_train_batch_size {self.per_device_train_batch_size} x "
            f"steps_per_generation {self.generation_steps} x world size {world_size} = {gen_batch}) "
            f"must be divisible by num_generations ({self.num_generations})",
        )
        need(self.max_prompt_length is None or self.max_prompt_length >= 1,
             f"max_prompt_length must be >= 1 or None, got {self.max_prompt_length}")
        need(self.max_steps != 0, "max_steps must be > 0, or -1 to train for num_train_epochs")
        need(self.max_steps > 0 or self.num_train_epochs > 0, f"num_train_epochs must be > 0, got {self.num_train_epochs}")
        need(math.isfinite(self.temperature) and self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        need(self.min_p is None or 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        need(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        need(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        need(self.epsilon >= 0, f"epsilon must be >= 0, got {self.epsilon}")
        need(self.epsilon_high is None or self.epsilon_high >= 0, f"epsilon_high must be >= 0, got {self.epsilon_high}")
        need(self.delta is None or self.delta > 1, f"delta must be > 1, got {self.delta}")
        need(self.loss_type in LOSS_TYPES, f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        need(self.importance_sampling_level in IS_LEVELS,
             f"importance_sampling_level must be one of {IS_LEVELS}, got {self.importance_sampling_level!r}")
        need(self.scale_rewards in SCALES, f"scale_rewards must be one of {SCALES}, got {self.scale_rewards!r}")
        need(self.learning_rate >= 0, f"learning_rate must be >= 0, got {self.learning_rate}")
        need(self.lr_scheduler_type in LR_SCHEDULES,
             f"lr_scheduler_type must be one of {LR_SCHEDULES}, got {self.lr_scheduler_type!r}")
        need(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        need(0 <= self.ref_model_mixup_alpha <= 1, f"ref_model_mixup_alpha must be in [0, 1], got {self.ref_model_mixup_alpha}")
        need(self.ref_model_sync_steps >= 1, f"ref_model_sync_steps must be >= 1, got {self.ref_model_sync_steps}")
        need(self.rollout_backend in ROLLOUT_BACKENDS,
             f"rollout_backend must be one of {ROLLOUT_BACKENDS}, got {self.rollout_backend!r}")
        for name in ("eval_steps", "save_steps", "save_total_limit", "eval_max_samples"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, int) and value >= 1), f"{name} must be a positive integer or None, got {value!r}")
        need(self.reward_weights is None or all(isinstance(w, (int, float)) for w in self.reward_weights),
             f"reward_weights must be a list of numbers, got {self.reward_weights!r}")

    @property
    def prompts_per_generation(self) -> int:
        return self.per_device_train_batch_size * self.generation_steps // self.num_generations

    @property
    def uses_old_logps(self) -> bool:
        # Once a generation batch feeds more than one optimizer step, the policy that sampled it
        # is no longer the one being trained, so its log-probs must be recorded at rollout time.
        return self.num_iterations > 1 or self.generation_steps > self.gradient_accumulation_steps

    @classmethod
    def from_dict(cls, values: dict) -> "GRPOConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GRPOConfig field(s): {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if callable(out.get("rollout_func")):
            out["rollout_func"] = getattr(out["rollout_func"], "__qualname__", repr(out["rollout_func"]))
        return out
