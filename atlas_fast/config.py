"""GRPOConfig: every knob of a GRPO run, validated once, with TRL's names and meanings.

A TRL user can bring a TRL 1.16 `GRPOConfig` as it is: `GRPOConfig(**trl_config.to_dict())`.
Every field of TRL's GRPOConfig and of its `TrainingArguments` parent is either
- honoured (the fields declared below, under TRL's name and meaning),
- translated (`use_vllm` + `vllm_mode` choose `rollout_backend`; `activation_checkpointing`
  is transformers 5's name for `gradient_checkpointing`), or
- accepted as a no-op while it holds TRL's default, because it changes nothing in a
  single-process GRPO run (`push_to_hub=False`, `dataloader_num_workers=0`, ...). Any other
  value of such a field is refused with an error that names the field and says what to use.
A name that is neither ours nor TRL's is refused with a did-you-mean, never a bare TypeError.

Where TRL and ATLAS disagree on a default we follow TRL 1.x, which is what most users run
today, and the ATLAS recipes in configs/recipe/ set ATLAS's values explicitly:
- beta = 0.0 (TRL) rather than 0.04 (ATLAS): no reference model is loaded unless asked for,
  which saves a full model copy and a forward pass per step.
- loss_type = "dapo" (TRL) rather than ATLAS's per-sequence mean ("grpo"): token-level
  normalisation does not favour short completions.
- use_bias_correction_kl = True (TRL 1.16): the KL term is weighted by the importance ratio;
  ATLAS's plain k3 is `use_bias_correction_kl=False` (the atlas_teacher recipe sets it).
- Weights load in float32 from a path, as TRL does (`model_init_kwargs={"dtype": ...}` changes it):
  bf16 weights would round away updates of lr ~1e-6 (an 8-bit mantissa); `bf16` runs the math in
  bf16 autocast on top of them.
Where we differ from TRL, and why:
- gradient_checkpointing = False (TRL says True): it costs ~30% more compute; turn it on when
  activations do not fit, as the large recipes do.
- bf16 = None (TRL says True): bf16 autocast when a CUDA GPU supports it, so the same config
  runs on a CPU, where TRL's default is an error.
- logging_steps = 1 (TRL 10) and save_steps = None (TRL 500: no checkpoints unless asked for).
- num_train_epochs = 1 (TRL 3): one pass over the prompts, ATLAS's recipes' unit; max_steps
  usually decides anyway.
- per_device_eval_batch_size = 16 (TRL 8): evaluation only generates, so it can take more prompts.
- eval_steps set while eval_strategy = "no" is an error here (TRL ignores eval_steps then).
- gradient_checkpointing_kwargs may only hold use_reentrant=False: our per-layer checkpointing
  is non-reentrant, the one variant that works with frozen inputs (LoRA).
report_to = "none" (TRL's default too) writes no integration logs; `output_dir/metrics.jsonl` is
always written: it is the run's own record, read by the plot and extended by a resumed run.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from atlas_kernels._validation import IS_LEVELS, LOSS_TYPES, SCALES

from .memory.offload import MODES as OFFLOAD_MODES
from .memory.packing import PACKED_ATTENTION
from .rollout import BACKENDS as ROLLOUT_BACKENDS

# transformers' schedule names, less reduce_lr_on_plateau (it needs an eval metric per step).
LR_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")  # torch.optim.AdamW, for-each or fused
STRATEGIES = ("no", "steps", "epoch")
REPORT_TO = ("none", "all", "jsonl", "tensorboard", "wandb")
VLLM_MODES = {"server": "vllm_server", "colocate": "vllm"}


@dataclass
class GRPOConfig:
    # -- run ------------------------------------------------------------------------------
    output_dir: str = "outputs/grpo"
    overwrite_output_dir: bool = False  # False: a new run into a folder holding a run is refused
    run_name: str | None = None
    seed: int = 42
    data_seed: int | None = None  # the prompt order's seed; None: seed
    max_steps: int = -1  # > 0 overrides num_train_epochs
    num_train_epochs: float = 1.0
    report_to: Any = "none"  # "none", "all", or names/list of: "tensorboard", "wandb"
    disable_tqdm: bool = False
    use_cpu: bool = False  # train on the CPU even when a GPU is there
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
    generation_kwargs: dict | None = None  # extra keyword arguments for the rollout backend's sampler
    chat_template_kwargs: dict | None = None  # e.g. {"enable_thinking": False}
    rollout_backend: str = "auto"  # atlas_fast.rollout: auto (engine on a GPU, else hf), hf, engine, vllm_server, vllm
    rollout_func: Any = None  # callable or "module:function"; replaces generation
    # TRL's vLLM switches: use_vllm=True picks rollout_backend "vllm_server" (vllm_mode="server")
    # or "vllm" (vllm_mode="colocate").
    use_vllm: bool = False
    vllm_mode: str = "colocate"
    vllm_server_base_url: str | None = None  # overrides host and port
    vllm_server_host: str = "0.0.0.0"
    vllm_server_port: int = 8000
    vllm_server_timeout: float = 240.0
    vllm_gpu_memory_utilization: float = 0.3
    vllm_enable_sleep_mode: bool = False
    vllm_max_model_length: int | None = None  # None: max_prompt_length + max_completion_length
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
    # Log-probs straight from the final hidden states, the LM head applied tile by tile: no
    # [B, C, V] logits (2.3 GiB of bf16 per 8k tokens at V = 151936). Models whose head is not a
    # plain linear layer (logit soft-capping or scaling, an adapter on the head) use the logits.
    fused_lm_head: bool = True
    # -- optimisation -----------------------------------------------------------------------
    learning_rate: float = 1e-6
    lr_scheduler_type: str = "linear"
    lr_scheduler_kwargs: dict | None = None  # transformers.get_scheduler's scheduler_specific_kwargs
    warmup_steps: float = 0.0  # >= 1: steps; a fraction in (0, 1): of the run (transformers 5)
    warmup_ratio: float = 0.0  # transformers 4's name for a fractional warmup_steps
    optim: str = "adamw_torch_fused"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    bf16: bool | None = None  # None: autocast to bf16 when a CUDA GPU supports it
    fp16: bool = False  # fp16 autocast with a gradient scaler
    gradient_checkpointing: bool = False
    gradient_checkpointing_kwargs: dict | None = None  # only {"use_reentrant": False}, which is what runs
    activation_offload: bool = False  # with gradient_checkpointing: saved layer inputs wait in pinned CPU memory
    # With gradient_checkpointing: each layer's attention output is kept as well (one more [N, H]
    # per layer, on the GPU), so the backward's recompute skips attention, most of it at long completions.
    checkpoint_keep_attention: bool = False
    optimizer_offload: bool = False  # fp32 master weights and AdamW moments on the CPU, stepped there
    # AdamW moments in pinned CPU memory, streamed through the GPU for the step: the default
    # optimizer's numbers (always its fused kernel, whatever `optim` says), its GPU memory down
    # to weights and gradients.
    optimizer_state_offload: bool = False
    padding_free: bool = False  # each micro-batch packed into one row without pad tokens
    # How a packed row's attention runs on sdpa/eager models: "varlen" (one varlen flash call per
    # layer on CUDA), "sequences" (SDPA per packed sequence: PyTorch's pick of kernel, cuDNN's on
    # Hopper, at one launch per sequence and layer) or "auto": sequences for rows whose sequences
    # average 6144 tokens or more (2.431 against 2.697 s per update at 1.5B / 8192 completion
    # tokens on an H200), varlen below (0.366 against 0.509 s at 1024).
    packed_attention: str = "auto"
    # The most tokens one forward pass of the update (and of the old/reference log-prob passes)
    # takes: a micro-batch holding more runs in row chunks under it, accumulating gradients, with
    # the micro-batch's loss and gradient unchanged. Activation memory then follows the budget, not
    # per_device_train_batch_size x sequence length. Counted as packed tokens with padding_free,
    # else rows x the longest row. Micro-batches of one optimizer step that fit it together run
    # as one pass (same objective and gradient; not with bnpo, which normalises each micro-batch
    # by its own tokens): small micro-batches then pay the host's per-pass work once. Logged token
    # means (kl, entropy, clip ratios) are then means over the merged tokens, not averages of each
    # micro-batch's own mean: they differ where micro-batches hold different numbers of tokens.
    # None: whole micro-batches, one pass each.
    max_forward_tokens: int | None = None
    # The policy's RMSNorms and SwiGLU activations in atlas_kernels' fused kernels, forward and
    # backward (fused_layers.py): one kernel each way where the stock modules launch ~6-10.
    fused_layers: bool = False
    # With fused_layers, the attention's rotary embedding too (atlas_kernels.rope, bit for bit
    # transformers' result): 0.351 against 0.419 s per update at 1.5B / 1024 tokens, 2.704 against
    # 2.918 s at 8192 (H200). No effect without fused_layers.
    fused_rotary: bool = True
    # With fused_layers, each Llama/Qwen2/Qwen3 decoder layer runs as one autograd node with a hand-written
    # backward (fused_decoder.py): ~280 host ops per layer's recompute and backward where autograd
    # dispatched ~580, the host's share of short-completion updates (0.206 -> 0.149 s for a
    # Qwen2.5-0.5B update over 8 x 1280 tokens, H200). Computes in the stock layer's dtypes, autocast too.
    # Its rotation is atlas_kernels.rope: with fused_rotary=False the layers stay unfused.
    fused_decoder: bool = True
    disable_dropout: bool = False
    # -- reference model --------------------------------------------------------------------
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    offload_untrained_models: bool = False  # ATLAS: keep reference/reward models on CPU
    offload_mode: str = "auto"  # how they visit the GPU: "layer" (streamed), "model" (wholesale), "auto"
    # -- logging, evaluation, checkpoints ------------------------------------------------
    logging_strategy: str = "steps"  # "no", "steps" (every logging_steps), "epoch"
    logging_steps: int = 1
    logging_first_step: bool = False
    log_entropy: bool = True  # TRL's `entropy` metric, from the loss's own sweep (+~20% on its forward)
    log_completions: bool = False
    eval_strategy: str = "no"  # "no", "steps" (every eval_steps, default logging_steps), "epoch"
    eval_steps: int | None = None
    eval_on_start: bool = False
    per_device_eval_batch_size: int = 16
    eval_max_samples: int | None = None
    save_strategy: str = "steps"  # "no", "steps" (every save_steps; None: never), "epoch"
    save_steps: int | None = None
    save_total_limit: int | None = None
    # -- models ----------------------------------------------------------------------------
    trust_remote_code: bool = False
    model_init_kwargs: dict | None = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_types(self)
        if isinstance(self.report_to, str):
            self.report_to = (self.report_to,)
        if not (isinstance(self.report_to, (list, tuple)) and all(isinstance(r, str) for r in self.report_to)):
            raise ValueError(f"report_to must be a name or a list of names, got {self.report_to!r}")
        self.report_to = tuple(self.report_to)
        if self.model_init_kwargs is None:
            self.model_init_kwargs = {}
        if self.use_vllm:
            if self.vllm_mode not in VLLM_MODES:
                raise ValueError(f"vllm_mode must be one of {tuple(VLLM_MODES)}, got {self.vllm_mode!r}")
            backend = VLLM_MODES[self.vllm_mode]
            if self.rollout_backend not in ("auto", "hf", backend):
                raise ValueError(f"use_vllm=True with vllm_mode={self.vllm_mode!r} means rollout_backend={backend!r}, "
                                 f"but rollout_backend={self.rollout_backend!r}: set one of them")
            self.rollout_backend = backend
        if self.steps_per_generation is not None and self.generation_batch_size is not None:
            # TRL's to_dict() carries both, resolved; they agree, and one is enough.
            if self.generation_batch_size != self.steps_per_generation * self.per_device_train_batch_size:
                raise ValueError("steps_per_generation and generation_batch_size are mutually exclusive: set one")
            self.generation_batch_size = None
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

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps for a run of `total_steps` optimizer steps."""
        fraction = self.warmup_steps if 0 < self.warmup_steps < 1 else self.warmup_ratio
        return math.ceil(fraction * total_steps) if fraction else int(self.warmup_steps)

    # A single place that knows every rule; errors name the field and the value.
    def validate(self, world_size: int = 1) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(self.num_generations >= 2, f"num_generations must be >= 2 (GRPO compares completions within a group), got {self.num_generations}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps",
                     "num_iterations", "max_completion_length", "logging_steps", "per_device_eval_batch_size"):
            value = getattr(self, name)
            need(value >= 1, f"{name} must be a positive integer, got {value!r}")
        for name in ("steps_per_generation", "generation_batch_size", "eval_steps", "save_steps", "save_total_limit",
                     "eval_max_samples", "max_prompt_length", "vllm_max_model_length"):
            value = getattr(self, name)
            need(value is None or value >= 1, f"{name} must be a positive integer or None, got {value!r}")
        gen_batch = self.per_device_train_batch_size * self.generation_steps * world_size
        need(
            gen_batch % self.num_generations == 0,
            f"the generation batch (per_device_train_batch_size {self.per_device_train_batch_size} x "
            f"steps_per_generation {self.generation_steps} x world size {world_size} = {gen_batch}) "
            f"must be divisible by num_generations ({self.num_generations})",
        )
        need(self.max_steps == -1 or self.max_steps > 0,
             f"max_steps must be > 0, or -1 to train for num_train_epochs, got {self.max_steps}")
        need(self.max_steps > 0 or (math.isfinite(self.num_train_epochs) and self.num_train_epochs > 0),
             f"num_train_epochs must be > 0, got {self.num_train_epochs}")
        need(math.isfinite(self.temperature) and self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        need(self.min_p is None or 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        need(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        need(math.isfinite(self.beta) and self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        need(self.epsilon >= 0, f"epsilon must be >= 0, got {self.epsilon}")
        need(self.epsilon_high is None or self.epsilon_high >= 0, f"epsilon_high must be >= 0, got {self.epsilon_high}")
        need(self.delta is None or self.delta > 1, f"delta must be > 1, got {self.delta}")
        need(self.loss_type in LOSS_TYPES, f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        need(self.importance_sampling_level in IS_LEVELS,
             f"importance_sampling_level must be one of {IS_LEVELS}, got {self.importance_sampling_level!r}")
        need(self.scale_rewards in SCALES, f"scale_rewards must be one of {SCALES}, got {self.scale_rewards!r}")
        need(math.isfinite(self.learning_rate) and self.learning_rate >= 0, f"learning_rate must be >= 0, got {self.learning_rate}")
        need(self.lr_scheduler_type in LR_SCHEDULES,
             f"lr_scheduler_type must be one of {LR_SCHEDULES}, got {self.lr_scheduler_type!r}")
        need(self.warmup_steps >= 0 and (self.warmup_steps < 1 or float(self.warmup_steps).is_integer()),
             f"warmup_steps must be a whole number of steps or a fraction in [0, 1), got {self.warmup_steps}")
        need(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        need(not (self.warmup_ratio and self.warmup_steps),
             "warmup_steps and warmup_ratio are mutually exclusive: set one (warmup_steps < 1 is a ratio)")
        need(self.optim in OPTIMIZERS, f"optim must be one of {OPTIMIZERS}, got {self.optim!r}; for another "
                                       "optimizer pass GRPOTrainer(optimizers=(optimizer, lr_scheduler))")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(not math.isnan(self.max_grad_norm), "max_grad_norm must be a number (<= 0 disables clipping), got nan")
        for name in ("adam_beta1", "adam_beta2"):
            need(0 <= getattr(self, name) < 1, f"{name} must be in [0, 1), got {getattr(self, name)}")
        need(self.adam_epsilon > 0, f"adam_epsilon must be > 0, got {self.adam_epsilon}")
        need(not (self.bf16 and self.fp16), "bf16 and fp16 are mutually exclusive: set one")
        need(0 <= self.ref_model_mixup_alpha <= 1, f"ref_model_mixup_alpha must be in [0, 1], got {self.ref_model_mixup_alpha}")
        need(self.ref_model_sync_steps >= 1, f"ref_model_sync_steps must be >= 1, got {self.ref_model_sync_steps}")
        need(self.packed_attention in PACKED_ATTENTION,
             f"packed_attention must be one of {PACKED_ATTENTION}, got {self.packed_attention!r}")
        need(self.offload_mode in OFFLOAD_MODES, f"offload_mode must be one of {OFFLOAD_MODES}, got {self.offload_mode!r}")
        need(self.max_forward_tokens is None or self.max_forward_tokens >= 1,
             f"max_forward_tokens must be >= 1 (or None for whole micro-batches), got {self.max_forward_tokens}")
        need(not self.checkpoint_keep_attention or self.gradient_checkpointing,
             "checkpoint_keep_attention keeps attention outputs through gradient checkpointing's recompute: "
             "set gradient_checkpointing=True too")
        need(not self.activation_offload or self.gradient_checkpointing,
             "activation_offload moves the layer inputs that gradient checkpointing saves: set gradient_checkpointing=True too")
        need(not (self.optimizer_offload and self.fp16),
             "optimizer_offload does not combine with fp16: the gradient scaler unscales the optimizer's own (CPU) "
             "parameters, not the model's gradients; use bf16")
        need(not (self.optimizer_offload and self.optimizer_state_offload),
             "optimizer_offload and optimizer_state_offload are two optimizers: set one")
        need(self.rollout_backend in ROLLOUT_BACKENDS,
             f"rollout_backend must be one of {ROLLOUT_BACKENDS}, got {self.rollout_backend!r}")
        need(0 < self.vllm_gpu_memory_utilization <= 1,
             f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        need(self.vllm_server_timeout > 0, f"vllm_server_timeout must be > 0, got {self.vllm_server_timeout}")
        need(1 <= self.vllm_server_port <= 65535, f"vllm_server_port must be in [1, 65535], got {self.vllm_server_port}")
        for name in ("logging_strategy", "eval_strategy", "save_strategy"):
            need(getattr(self, name) in STRATEGIES, f"{name} must be one of {STRATEGIES}, got {getattr(self, name)!r}"
                 + ("; keep the best checkpoint yourself from metrics.jsonl" if getattr(self, name) == "best" else ""))
        need(not (self.eval_steps and self.eval_strategy == "no"),
             f"eval_steps={self.eval_steps} has no effect with eval_strategy='no': set eval_strategy='steps'")
        extra = {k: v for k, v in (self.gradient_checkpointing_kwargs or {}).items() if (k, v) != ("use_reentrant", False)}
        need(not extra, f"gradient_checkpointing_kwargs: {extra} is not supported; atlas-fast checkpoints each decoder "
                        "layer with use_reentrant=False (the only setting that works with frozen inputs and LoRA)")
        unknown = sorted({r.strip().lower() for r in self.report_to} - set(REPORT_TO))
        need(not unknown, f"report_to: unsupported integration(s) {unknown}; use one of {REPORT_TO}")
        need(self.reward_weights is None or all(math.isfinite(w) for w in self.reward_weights),
             f"reward_weights must be finite numbers, got {self.reward_weights!r}")

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
        return cls(**values)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if callable(out.get("rollout_func")):
            out["rollout_func"] = getattr(out["rollout_func"], "__qualname__", repr(out["rollout_func"]))
        return out


# ---------------------------------------------------------------------- types
def check_types(config: GRPOConfig) -> None:
    """Each field against its annotation, naming the field: `learning_rate="abc"` and `beta="0.1"`
    are refused here rather than failing later in a comparison. Ints widen to floats."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        ok, converted = conform(value, hints[f.name])
        if not ok:
            raise ValueError(f"{f.name} must be {describe(hints[f.name])}, got {value!r}")
        setattr(config, f.name, converted)


def conform(value: Any, hint: Any) -> tuple[bool, Any]:
    """(matches, value converted to the annotated type): ints widen to float, tuples to lists."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return type(None) in args, None
        return next(((True, v) for ok, v in (conform(value, a) for a in args if a is not type(None)) if ok),
                    (False, value))
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if hint is dict or origin is dict:
        return isinstance(value, dict), value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return False, value
        results = [conform(v, args[0]) for v in value]
        return all(ok for ok, _ in results), [v for _, v in results]
    return True, value


def describe(hint: Any) -> str:
    args = typing.get_args(hint)
    if type(None) in args:
        return " or ".join([describe(a) for a in args if a is not type(None)] + ["None"])
    if typing.get_origin(hint) is list:
        return f"a list of {describe(args[0])}"
    names = {bool: "True or False", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    return names.get(hint, str(hint))


# ---------------------------------------------------------------------- TRL's other fields
# TrainingArguments / TRL GRPOConfig fields that change nothing in a single-process GRPO run,
# with the values that mean "unset" (TRL's default, and what its to_dict() writes for it).
# Any other value is refused, with the advice in NOOP_ADVICE (or a generic line).
_HUB = "upload output_dir/final with huggingface_hub after training"
_DIST = "atlas-fast trains in one process; fit memory with gradient_checkpointing, offload_untrained_models or LoRA"
NOOP_FIELDS: dict[str, tuple] = {
    # TrainingArguments
    "average_tokens_across_devices": (True, False), "label_smoothing_factor": (0.0,), "optim_args": (None,),
    "optim_target_modules": (None,), "bf16_full_eval": (False,), "fp16_full_eval": (False,), "tf32": (None,),
    "torch_compile": (False,), "torch_compile_backend": (None,),
    "torch_compile_mode": (None,), "use_liger_kernel": (False,), "liger_kernel_config": (None,), "use_cache": (False,),
    "neftune_noise_alpha": (None,), "torch_empty_cache_steps": (None,), "auto_find_batch_size": (False,),
    "log_on_each_node": (True,), "logging_nan_inf_filter": (True,), "include_num_input_tokens_seen": ("no", False),
    "log_level": ("passive",), "log_level_replica": ("warning",), "logging_dir": (None,), "project": ("huggingface",),
    "trackio_space_id": (None, "trackio"), "trackio_bucket_id": (None,), "trackio_static_space_id": (None,),
    "eval_delay": (0, 0.0), "prediction_loss_only": (False,), "eval_do_concat_batches": (True,),
    "eval_use_gather_object": (False,), "eval_accumulation_steps": (None,), "include_for_metrics": ((), []),
    "batch_eval_metrics": (False,), "save_only_model": (False,), "save_on_each_node": (False,),
    "save_safetensors": (True,), "enable_jit_checkpoint": (False,), "push_to_hub": (False,), "hub_token": (None, "<HUB_TOKEN>"),
    "hub_private_repo": (None,), "hub_model_id": (None,), "hub_strategy": ("every_save",), "hub_always_push": (False,),
    "hub_revision": (None,), "load_best_model_at_end": (False,), "metric_for_best_model": (None,),
    "greater_is_better": (None,), "ignore_data_skip": (False,), "restore_callback_states_from_checkpoint": (False,),
    "full_determinism": (False,), "accelerator_config": (None, {
        "split_batches": False, "dispatch_batches": None, "even_batches": True, "use_seedable_sampler": True,
        "non_blocking": False, "gradient_accumulation_kwargs": None}),
    "parallelism_config": (None,), "dataloader_drop_last": (False,), "dataloader_num_workers": (0,),
    "dataloader_pin_memory": (True, False), "dataloader_persistent_workers": (False,), "dataloader_prefetch_factor": (None,),
    "dataloader_multiprocessing_context": (None,), "dataloader_in_order": (True,), "remove_unused_columns": (False,),
    "label_names": (None,), "train_sampling_strategy": ("random",), "length_column_name": ("length",),
    "ddp_find_unused_parameters": (None,), "ddp_bucket_cap_mb": (None,), "ddp_broadcast_buffers": (None,),
    "ddp_static_graph": (None,), "ddp_backend": (None,), "ddp_timeout": (1800,), "fsdp": (None, "", []),
    "fsdp_config": (None,), "deepspeed": (None,), "debug": ("", []), "skip_memory_metrics": (True,),
    "do_train": (False, True), "do_eval": (False, True), "do_predict": (False, True),  # flags for scripts
    "resume_from_checkpoint": (None,),
    "local_rank": (-1,), "jit_mode_eval": (False,), "use_ipex": (False,), "past_index": (-1,),
    # TRL GRPOConfig
    "router_aux_loss_coef": (None,), "cast_lm_head_to_fp32": (False,), "num_generations_eval": (None,),
    "ds3_gather_for_generation": (True,), "pad_to_multiple_of": (None, "auto"), "cache_implementation": (None,),
    "vllm_model_impl": ("vllm",), "vllm_structured_outputs_regex": (None,), "vllm_group_port": (51216,),
    "vllm_tensor_parallel_size": (1,), "sapo_temperature_neg": (1.05,), "sapo_temperature_pos": (1.0,),
    "vespo_k_pos": (2.0,), "vespo_lambda_pos": (3.0,), "vespo_k_neg": (3.0,), "vespo_lambda_neg": (2.0,),
    "multi_objective_aggregation": ("sum_then_normalize",), "top_entropy_quantile": (1.0,), "entropy_coef": (0.0,),
    "use_adaptive_entropy": (False,), "entropy_coef_min": (0.0,), "entropy_coef_max": (1.0,),
    "entropy_coef_delta": (0.005,), "entropy_target": (0.2,), "max_tool_calling_iterations": (None,),
    # TRL corrects vLLM's sampling mismatch with truncated importance weights; the vLLM backends
    # here sample from the same weights and do not apply it (these settings are then inert).
    "vllm_importance_sampling_correction": (True, False), "vllm_importance_sampling_mode": ("sequence_mask",),
    "vllm_importance_sampling_clip_max": (3.0,), "vllm_importance_sampling_clip_min": (None,),
    "vllm_importance_sampling_cap": (None,), "off_policy_mask_threshold": (None,), "log_multimodal": (True,),
    "num_completions_to_print": (None,), "log_unique_prompts": (False,), "log_completions_hub_repo": (None,),
    "use_transformers_continuous_batching": (False,), "transformers_continuous_batching_config": (None,),
    "use_transformers_paged": (False,),
}
NOOP_ADVICE = {
    "torch_compile": "the loss already runs in fused Triton kernels (use_kernels=True)",
    "use_liger_kernel": "atlas-fast's own fused GRPO kernels are on by default (use_kernels=True)",
    "deepspeed": _DIST, "fsdp": _DIST, "fsdp_config": _DIST, "parallelism_config": _DIST, "local_rank": _DIST,
    "push_to_hub": _HUB, "hub_model_id": _HUB, "hub_strategy": _HUB, "hub_private_repo": _HUB, "hub_token": _HUB,
    "resume_from_checkpoint": "pass it to trainer.train(resume_from_checkpoint=...)",
    "optim_args": "pass GRPOTrainer(optimizers=(optimizer, lr_scheduler)) for a custom optimizer",
    "load_best_model_at_end": "pick the best checkpoint-<step> from metrics.jsonl",
    "num_generations_eval": "evaluation decodes one greedy completion per prompt",
    "vllm_tensor_parallel_size": "run `vllm serve --tensor-parallel-size N` and use vllm_mode='server'",
    "dataloader_num_workers": "prompts are read in the training process; pre-tokenise large datasets instead",
    "multi_objective_aggregation": "atlas-fast sums weighted rewards, then normalises (TRL's default)",
    "cast_lm_head_to_fp32": "the fused loss already accumulates the head's log-softmax in fp32",
}
ALIASES = {"activation_checkpointing": "gradient_checkpointing",  # transformers 5's new names
           "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs"}


def _translate(values: dict) -> dict:
    """TRL's fields -> ours: aliases renamed, no-ops checked and dropped, unknown names refused."""
    known = {f.name for f in dataclasses.fields(GRPOConfig)}
    out = {}
    for name, value in values.items():
        if name in ALIASES:
            target = ALIASES[name]
            if target in values and values[target] != value:
                if value is None:  # the alias left unset
                    continue
                raise ValueError(f"{name}={value!r} and {target}={values[target]!r} disagree: set {target}")
            out[target] = value
        elif name in known:
            out[name] = value
        elif name in NOOP_FIELDS:
            if not any(_same(value, ok) for ok in NOOP_FIELDS[name]):
                advice = NOOP_ADVICE.get(name, f"leave it at TRL's default ({NOOP_FIELDS[name][0]!r})")
                raise ValueError(f"{name}={value!r} is not supported by atlas-fast: {advice}")
        else:
            close = difflib.get_close_matches(name, sorted(known | set(NOOP_FIELDS)), n=1)
            raise ValueError(f"unknown GRPOConfig field {name!r}" + (f"; did you mean {close[0]}?" if close else ""))
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) is not isinstance(b, bool):  # 0 == False, but push_to_hub=0 is a mistake
        return False
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def _accept_trl_fields(cls):
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, **values):
        init(self, **_translate(values))

    cls.__init__ = __init__
    return cls


_accept_trl_fields(GRPOConfig)
