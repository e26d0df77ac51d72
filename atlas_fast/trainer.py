"""GRPOTrainer: a hand-written GRPO loop on top of atlas_kernels.

One optimizer step reads top to bottom in `train`:
    rollout (generate G completions per prompt) -> rewards -> group advantages
    -> reference / old log-probs -> micro-batches: forward, fused loss, backward
    -> clip -> step -> log -> evaluate -> checkpoint.
`_next_micro_batch` hands out finished micro-batches and generates a new batch
whenever the last one is used up (`steps_per_generation` micro-steps, `num_iterations` passes),
so the loop body never deals with buffering. A step's generation happens inside it, between
`on_step_begin` and `on_step_end`, as in TRL, so a callback that times steps measures the same.

Modes: the policy trains in training mode (dropout, and transformers applies gradient
checkpointing only to modules in training mode); generation, old and reference log-probs and
frozen models run in eval mode.

The class is a thin shell: the math lives in atlas_kernels, batching in data.py, generation in
rollout.py, rewards in rewards.py, persistence in checkpoint.py, logging in metrics.py.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import functools
import itertools
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import TrainerControl, TrainerState, get_scheduler

import atlas_kernels
from atlas_kernels import reference as kernels_reference

from . import checkpoint as ckpt
from .batch import (LMHead, MicroBatch, completion_hidden, completion_logits, concat_micro_batches, split_lm_head,
                    trim)
from .config import GRPOConfig
from .data import PromptSampler, is_conversational, load_dataset_any, render_prompt
from .memory import (OffloadedAdamW, PhaseReport, StreamedAdamW, enable_gradient_checkpointing, frozen_offload, on_device,
                     packed_completion_hidden, packed_completion_logits, place_frozen, prepare_packing,
                     split_micro_batches, token_chunks)
from .fused_layers import fuse_layers
from .metrics import MetricsLogger, format_metrics, plot_metrics
from .modeling import load_causal_lm, load_tokenizer
from .rewards import (append_reward_tables, combine_rewards, compute_rewards, prepare_reward_funcs,
                      reward_metrics, reward_reports)
from .rollout import (FINISH_STOP, SamplingParams, build_backend, left_pad, resolve_backend, resolve_rollout_func,
                      right_pad, stop_ids)


# Curves drawn into output_dir/metrics.png at the end of training (absent keys are skipped).
PLOT_KEYS = ("reward", "eval/reward", "kl", "entropy", "completions/mean_length")


@dataclass
class EvalPrediction:
    """What `compute_metrics` receives: one greedy completion per evaluation prompt."""

    prompts: list
    completions: list
    rewards: dict[str, list[float]]
    columns: dict[str, list]


@dataclass
class Rollout:
    """One generation batch as sampled: N = prompts x G completions, each group contiguous."""

    prompts: list  # [N] what reward functions receive as `prompts`
    prompt_ids: list[list[int]]  # [N] the exact ids each completion was sampled from: the loss conditions on them
    completion_ids: list[list[int]]  # [N]
    finished: list[bool]  # [N] ended on EOS or a stop id
    columns: dict[str, list]  # [N] per column: the reward functions' extra keyword arguments
    metrics: dict[str, float] = field(default_factory=dict)  # logged with the step


class GRPOTrainer:
    def __init__(
        self,
        config: GRPOConfig | None = None,
        model: torch.nn.Module | str | None = None,
        ref_model: torch.nn.Module | str | None = None,
        tokenizer: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        reward_funcs: Any = None,
        reward_model: Any = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: Sequence[Any] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        rollout_func: Callable | str | None = None,
        peft_config: Any = None,
    ):
        self.args = config = config or GRPOConfig()
        if model is None:
            raise ValueError("GRPOTrainer needs a model (a PreTrainedModel or a local path / hub id)")
        _refuse_several_processes()
        torch.manual_seed(config.seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() and not config.use_cpu else "cpu")
        self.model = self._load_model(model, peft_config).to(self.device)
        self.tokenizer = tokenizer if tokenizer is not None else self._load_tokenizer(model)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if config.fused_layers:
            fuse_layers(self.model, rotary=config.fused_rotary, decoder=config.fused_decoder)  # before the reference copy, which keeps the swap
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(self.model, offload=config.activation_offload,
                                          keep_attention=config.checkpoint_keep_attention)
        if config.disable_dropout:
            for module in self.model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        use_bf16 = config.bf16 if config.bf16 is not None else (
            not config.fp16 and self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        self.autocast_dtype = torch.bfloat16 if use_bf16 else torch.float16 if config.fp16 else None
        # fp16's 5-bit exponent underflows small gradients: scale the loss (transformers does the same).
        self.scaler = torch.amp.GradScaler(self.device.type) if config.fp16 else None

        self.ref_model = self._reference_model(ref_model)
        # Padding-free rows need both models ready for them; a model that cannot keeps padded batches.
        self.padding_free = config.padding_free and all(
            prepare_packing(m, attention=config.packed_attention) for m in (self.model, self.ref_model) if m is not None)
        self._completion_logits = packed_completion_logits if self.padding_free else completion_logits
        self._completion_hidden = packed_completion_hidden if self.padding_free else completion_hidden
        if self.ref_model is not None:
            place_frozen(self.ref_model, self.device, offload=config.offload_untrained_models, mode=config.offload_mode)
        self.reward_funcs = prepare_reward_funcs(reward_funcs, reward_model)
        for _, fn in self.reward_funcs:
            place_frozen(fn, self.device, offload=config.offload_untrained_models, mode=config.offload_mode)
            if isinstance(fn, torch.nn.Module):
                fn.eval()  # frozen: no dropout
        n_funcs = len(self.reward_funcs)
        if config.reward_weights is not None and len(config.reward_weights) != n_funcs:
            raise ValueError(f"reward_weights has {len(config.reward_weights)} entries for {n_funcs} reward functions")

        if train_dataset is None:
            raise ValueError("GRPOTrainer needs a train_dataset")
        self.train_dataset = load_dataset_any(train_dataset)
        self.eval_dataset = load_dataset_any(eval_dataset) if eval_dataset is not None else None
        if config.eval_strategy != "no" and self.eval_dataset is None:  # found now, not at the first evaluation
            raise ValueError(f"eval_strategy={config.eval_strategy!r} needs an eval_dataset: pass one to the trainer "
                             "or set eval_strategy='no'")
        for label, dataset in (("train", self.train_dataset), ("eval", self.eval_dataset)):
            check_reward_columns(self.reward_funcs, dataset, label, extra=getattr(self, "rollout_columns", ()))
        seed = config.data_seed if config.data_seed is not None else config.seed
        self.sampler = PromptSampler(self.train_dataset, config.prompts_per_generation,
                                     shuffle=config.shuffle_dataset, seed=seed)
        self.max_steps = self._resolve_max_steps()

        self.optimizer, self.lr_scheduler = optimizers
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        for flag in ("optimizer_offload", "optimizer_state_offload"):
            if getattr(config, flag) and self.optimizer is not None:
                raise ValueError(f"{flag} builds its own AdamW: pass optimizers=(None, scheduler) or turn it off")
        adamw = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                     weight_decay=config.weight_decay)
        if config.optimizer_offload:  # fp32 masters and moments in CPU memory; the model keeps autocast-dtype weights
            self.optimizer = OffloadedAdamW(self._trainable, **adamw, weight_dtype=self.autocast_dtype)
        if config.optimizer_state_offload:  # moments in CPU memory, the step on the device
            self.optimizer = StreamedAdamW(self._trainable, **adamw)
        if self.optimizer is None:  # fused: one kernel for all parameters
            self.optimizer = torch.optim.AdamW(self._trainable, **adamw, fused=config.optim == "adamw_torch_fused")
        if self.lr_scheduler is None:
            self.lr_scheduler = get_scheduler(
                config.lr_scheduler_type, self.optimizer, num_warmup_steps=config.warmup_for(self.max_steps),
                num_training_steps=self.max_steps, scheduler_specific_kwargs=config.lr_scheduler_kwargs)

        self.rollout_func = resolve_rollout_func(rollout_func if rollout_func is not None else config.rollout_func)
        self.rollout = self._build_rollout()
        self.kernels = atlas_kernels if config.use_kernels else kernels_reference
        self.lm_head = self._fused_head(self.model)  # None: the policy's log-probs come from its logits
        self.compute_metrics = compute_metrics
        self.callbacks = list(callbacks or [])
        self.state = TrainerState(max_steps=self.max_steps, logging_steps=config.logging_steps,
                                  eval_steps=config.eval_steps or 0, save_steps=config.save_steps or 0)
        self.control = TrainerControl()
        self.logger: MetricsLogger | None = None  # opened by claim_output_dir, once the folder is checked
        self._unwritten_logs: list[tuple[dict, int]] = []  # logged before the folder was claimed
        self.current_rewards = torch.zeros(0)
        self.current_kl = torch.zeros(0)
        self._generation_metrics: dict = {}
        self._pending: list[MicroBatch] = []  # micro-batches of the current generation still to train on
        self._epochs_ended = 0  # epochs whose last rows this step trains on: on_epoch_end after the step
        # Epochs whose last rows are in the generation batch being trained: they end with the step
        # that trains its last micro-batch (the rows of a batch train over steps_per_generation steps).
        self._epochs_ending = 0
        self._num_tokens = 0
        self.memory = PhaseReport(self.device)  # memory/<phase>_peak_gib (CUDA) and time/<phase>_s in each step
        self._epochs_announced: set[int] = set()  # epochs whose on_epoch_begin has fired
        self._last_good: dict | None = None  # state at the end of the last good step (NaN guard)

    # ------------------------------------------------------------------ construction helpers
    def _load_model(self, model, peft_config):
        if isinstance(model, (str, Path)):
            model = load_causal_lm(model, self.args.trust_remote_code, **self._model_init_kwargs())
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        return model

    def _load_tokenizer(self, model):
        source = model if isinstance(model, (str, Path)) else getattr(model.config, "_name_or_path", None)
        if not source:
            raise ValueError("pass a tokenizer: it cannot be inferred from a model built in memory")
        return load_tokenizer(source, self.args.trust_remote_code)

    def _model_init_kwargs(self) -> dict:
        """from_pretrained's arguments. The weights load in float32 unless `dtype` says otherwise,
        as TRL loads them (transformers 5 alone would keep the checkpoint's dtype, often bf16)."""
        kwargs = dict(self.args.model_init_kwargs)
        dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", "float32"))
        if isinstance(dtype, str) and dtype != "auto":
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f"model_init_kwargs: dtype must be 'auto' or a torch dtype name, got {dtype!r}")
            dtype = getattr(torch, dtype)
        return {**kwargs, "dtype": dtype}

    def _rollout_options(self) -> dict:
        """The chosen backend's keyword arguments, read from the config in this one place."""
        c = self.args
        backend = resolve_backend(c.rollout_backend, self.model)
        if backend == "hf":
            return {"generation_kwargs": c.generation_kwargs} if c.generation_kwargs else {}
        if backend == "vllm_server":
            base_url = c.vllm_server_base_url or f"http://{c.vllm_server_host}:{c.vllm_server_port}"
            return {"base_url": base_url, "timeout": c.vllm_server_timeout}
        if backend == "vllm":
            prompt = c.max_prompt_length or getattr(self.model.config, "max_position_embeddings", 0) - c.max_completion_length
            return {"gpu_memory_utilization": c.vllm_gpu_memory_utilization, "enable_sleep_mode": c.vllm_enable_sleep_mode,
                    "max_model_len": c.vllm_max_model_length or prompt + c.max_completion_length}
        if backend == "engine":
            # Decode in the precision the update computes in (autocast over float32 weights).
            return {"dtype": self.autocast_dtype or next(self.model.parameters()).dtype}
        return {}

    def _build_rollout(self):
        options = self._rollout_options()
        try:
            return build_backend(self.args.rollout_backend, self.model, self.tokenizer, **options)
        except TypeError as err:
            if "unexpected keyword argument" not in str(err):
                raise
            raise ValueError(f"rollout_backend={self.args.rollout_backend!r} does not take the options "
                             f"{sorted(options)} that the config sets ({err})") from err

    def _reference_model(self, ref_model):
        if self.args.beta == 0.0:
            return None  # no KL term: never pay for a second model
        if is_peft(self.model):
            return None  # the policy with its adapter disabled is the reference
        if isinstance(ref_model, (str, Path)):
            ref_model = load_causal_lm(ref_model, self.args.trust_remote_code, **self._model_init_kwargs())
        elif ref_model is None:
            ref_model = copy.deepcopy(self.model)
        ref_model.eval().requires_grad_(False)
        if self.args.fused_layers:
            fuse_layers(ref_model, rotary=self.args.fused_rotary)  # a copy of the policy is swapped already
        return ref_model

    def _resolve_max_steps(self) -> int:
        c = self.args
        if c.max_steps > 0:
            return c.max_steps
        if self.sampler.num_rows is None:
            raise ValueError("max_steps must be set when the train dataset is an IterableDataset (its length is unknown)")
        generations = self.sampler.num_batches(c.num_train_epochs)
        return max(1, math.ceil(generations * c.generation_steps * c.num_iterations / c.gradient_accumulation_steps))

    # ------------------------------------------------------------------ the loop
    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainerState:
        c = self.args
        self.claim_output_dir(resuming=bool(resume_from_checkpoint))
        if resume_from_checkpoint:
            self._resume(resume_from_checkpoint)
        self.control.should_training_stop = False  # as in transformers: a stop ends one train() call
        self._event("on_train_begin")
        if c.eval_on_start and self.state.global_step == 0 and self.eval_dataset is not None:
            self.evaluate()
        self._last_good = self._snapshot()
        bar = tqdm(total=self.max_steps, initial=self.state.global_step, disable=c.disable_tqdm, desc="grpo")
        while self.state.global_step < self.max_steps and not self.control.should_training_stop:
            t0 = time.perf_counter()
            self._announce_epochs(self.sampler.upcoming_epochs() if not self._pending else ())
            self._event("on_step_begin")
            metrics = self._optimizer_step()  # generates when the last generation batch is spent
            self.state.global_step += 1
            if not self._pending:  # this step trained the batch's last rows
                self._epochs_ended, self._epochs_ending = self._epochs_ended + self._epochs_ending, 0
            self.state.epoch = self.sampler.epoch + self.sampler.position / max(self.sampler.num_rows or 1, 1)
            elapsed = time.perf_counter() - t0
            metrics.update(step_time=elapsed, tokens_per_sec=metrics.pop("_tokens") / elapsed,
                           num_tokens=self._num_tokens)
            self._maybe_sync_ref_model()

            self._set_control()
            self.on_step_end(self.args, self.state, self.control, metrics=metrics)
            self._event("on_step_end", metrics=metrics)
            if self.control.should_log:
                self.log(metrics)
                bar.set_postfix_str(format_metrics(metrics, keys=("reward", "kl", "loss")))
                self.control.should_log = False
            if self.control.should_evaluate:
                self.evaluate()
            if self.control.should_save:
                self._save_checkpoint()
                self.control.should_save = False
            # After the step that trained on the epoch's last rows, as transformers orders it. A batch
            # that spans two epochs begins the next one before this step and ends the last one after it.
            for _ in range(self._epochs_ended):
                self._event("on_epoch_end")
            self._epochs_ended = 0
            self._last_good = self._snapshot()
            bar.update(1)
        bar.close()
        self._event("on_train_end")
        self._plot()
        return self.state

    def _set_control(self) -> None:
        """What happens after this step: TRL's logging / eval / save strategies."""
        c = self.args
        step, epoch_ended = self.state.global_step, self._epochs_ended > 0

        def due(strategy: str, every: int | None) -> bool:
            if strategy == "epoch":
                return epoch_ended
            return strategy == "steps" and bool(every) and step % every == 0

        self.control.should_log = (due(c.logging_strategy, c.logging_steps) or (c.logging_first_step and step == 1)
                                   or (c.logging_strategy == "steps" and step == self.max_steps))
        self.control.should_evaluate = due(c.eval_strategy, c.eval_steps or c.logging_steps)
        self.control.should_save = due(c.save_strategy, c.save_steps)
        if step >= self.max_steps:  # as transformers ends a run: its last steps are evaluated and saved too
            self.control.should_evaluate |= c.eval_strategy == "steps"
            self.control.should_save |= c.save_strategy == "steps" and bool(c.save_steps)  # None: never

    def _announce_epochs(self, epochs) -> None:
        for epoch in epochs:
            if epoch not in self._epochs_announced:
                self._epochs_announced.add(epoch)
                self.on_epoch_begin()
                self._event("on_epoch_begin")

    def _plot(self) -> None:
        out = Path(self.args.output_dir)
        if not (out / "metrics.jsonl").exists():
            return
        try:
            plot_metrics(out / "metrics.jsonl", out / "metrics.png", keys=PLOT_KEYS)
        except ImportError as err:
            print(f"note: skipped {out / 'metrics.png'}: {err.name or 'matplotlib'} is not installed "
                  "(pip install matplotlib)", file=sys.stderr)

    def _optimizer_step(self) -> dict:
        """Gradient accumulation over micro-batches, then clip and step."""
        c = self.args
        sums: dict[str, float] = {}
        tokens = 0
        for mb, count in self._update_batches():
            _set_training(self.model, True)  # generation and log-prob passes switch to eval mode
            with self.memory.phase("update"):
                for part, loss_share, token_share in self._forward_parts(mb):
                    with self._autocast():
                        loss, stats = self._loss(part)
                    # A merged pass normalises as one micro-batch of `count` micro-batches' rows;
                    # `count` restores their sum (only row-mean and num_items losses are merged).
                    loss = loss * (loss_share * (count if c.loss_type in ROW_MEAN_LOSSES else 1))
                    if not torch.isfinite(loss):
                        self._stop_on_non_finite(f"loss is {float(loss.detach())}")
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
                    sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())  # host sync, for logging
                    for k, v in stats.items():  # token means over the part: weighted back to the micro-batches'
                        sums[k] = sums.get(k, 0.0) + float(v) * token_share * count
            tokens += int(mb.attention_mask.sum())
        max_norm = c.max_grad_norm if c.max_grad_norm > 0 else float("inf")
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self._trainable, max_norm)
        # A finite loss can still back-propagate inf/NaN (an overflow in the backward): stepping would
        # write it into the weights and the next checkpoint. fp16's scaler skips such steps itself.
        if not self.scaler and not torch.isfinite(grad_norm):
            self._stop_on_non_finite(f"gradient norm is {float(grad_norm)}")
        lr = self.lr_scheduler.get_last_lr()[0]  # the rate this step uses, before the schedule advances
        with self.memory.phase("optimizer"):
            if self.scaler:
                self.scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
                self.scaler.update()
            else:
                self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.rollout.update_weights(self.model)  # free for in-place backends; a push for servers
        self._num_tokens += tokens
        metrics = {k: v / c.gradient_accumulation_steps for k, v in sums.items()}
        metrics["loss"] = sums["loss"]  # the accumulated objective, already scaled per micro-batch
        metrics["grad_norm"] = float(grad_norm)
        if "kl" in metrics:
            self.current_kl = torch.tensor([metrics["kl"]])
        metrics.update(self._generation_metrics)
        metrics.update(self.memory.metrics())
        self._generation_metrics = {}
        metrics["_tokens"] = tokens
        metrics["learning_rate"] = lr
        return metrics

    def _loss(self, mb: MicroBatch):
        c = self.args
        if self.lm_head is not None:
            # The body up to its final norm, then the head fused with the loss: no [B, C + 1, V] logits.
            hidden = self._completion_hidden(self.lm_head, mb)  # [B, C + 1, H]: the kernels skip the last position
            inputs = (hidden, self.lm_head.weight)
            loss_fn = functools.partial(self.kernels.fused_linear_grpo_loss, bias=self.lm_head.bias)
        else:
            inputs = (self._completion_logits(self.model, mb),)  # [B, C + 1, V]: the kernels skip the last position
            loss_fn = self.kernels.grpo_loss_from_logits
        loss, stats = loss_fn(
            *inputs, mb.completion_ids, mb.old_logps, mb.ref_logps, mb.advantages, mb.completion_mask,
            temperature=c.temperature, beta=c.beta, epsilon_low=c.epsilon, epsilon_high=c.epsilon_high,
            delta=c.delta, loss_type=c.loss_type, importance_sampling_level=c.importance_sampling_level,
            max_completion_length=c.max_completion_length, use_bias_correction_kl=c.use_bias_correction_kl,
            return_entropy=c.log_entropy, validate=False,  # ids were range-checked at rollout
            # num_items counts the whole generation batch; one optimizer step sees
            # gradient_accumulation_steps / steps_per_generation of it (TRL's normaliser).
            num_items=(mb.num_items * c.gradient_accumulation_steps / c.generation_steps
                       if c.loss_type in ("dapo", "cispo") else None),
        )
        if c.loss_type not in ("dapo", "cispo"):
            loss = loss / c.gradient_accumulation_steps  # per-micro-batch normalisers: average the steps
        return loss, stats

    def _update_batches(self):
        """(micro-batch, how many micro-batches it holds) for each forward pass of one optimizer step.

        Without max_forward_tokens, each micro-batch as it comes. With it, consecutive micro-batches
        that fit the budget together run as one pass: the per-pass work on the host (hundreds of
        launches per layer, forward and backward) is paid once, which is most of the update when
        micro-batches are small. Only losses whose sum over the merged micro-batches is one pass's
        loss times a constant are merged: grpo and dr_grpo (a mean over rows, equal row counts)
        and dapo / cispo (one normaliser for the generation batch); bnpo normalises each
        micro-batch by its own tokens and is never merged."""
        steps = self.args.gradient_accumulation_steps
        if not self._merges or steps == 1:
            for _ in range(steps):
                yield self._next_micro_batch(), 1
            return
        mbs = [self._next_micro_batch() for _ in range(steps)]
        for group in self._merge_groups(mbs):
            yield concat_micro_batches(mbs[group.start:group.stop]), len(group)

    @property
    def _merges(self) -> bool:
        """Whether micro-batches may share a forward pass (see _update_batches)."""
        return self.args.max_forward_tokens is not None and self.args.loss_type != "bnpo"

    def _merge_groups(self, mbs: list[MicroBatch]) -> list[range]:
        """Consecutive runs of `mbs` that one forward pass takes together (see _update_batches)."""
        if not self._merges:
            return [range(i, i + 1) for i in range(len(mbs))]
        # Packed rows cost their tokens (one host sync per micro-batch); padded rows, rows x the widest.
        sizes = [int(m.attention_mask.sum()) for m in mbs] if self.padding_free else None
        groups, start = [], 0
        for end in range(1, len(mbs) + 1):
            if end == len(mbs) or not self._merge_fits(mbs[start:end + 1], sizes and sizes[start:end + 1]):
                groups.append(range(start, end))
                start = end
        return groups

    def _merge_fits(self, group: list[MicroBatch], sizes: list[int] | None) -> bool:
        first, last = group[0], group[-1]
        if self.args.loss_type in ROW_MEAN_LOSSES and len(last.advantages) != len(first.advantages):
            return False
        if last.num_items != first.num_items or (last.old_logps is None) != (first.old_logps is None) \
                or (last.ref_logps is None) != (first.ref_logps is None):
            return False  # another generation batch, or other log-probs
        if sizes is None:
            C = max(m.completion_ids.shape[1] for m in group)
            P = max(m.input_ids.shape[1] - m.completion_ids.shape[1] for m in group)
            sizes = [sum(len(m.advantages) for m in group) * (P + C)]
        return sum(sizes) <= self.args.max_forward_tokens

    def _forward_parts(self, mb: MicroBatch) -> list[tuple[MicroBatch, float, float]]:
        """(rows, loss share, completion-token share) per forward pass of `mb`: the whole micro-batch,
        or row chunks of at most max_forward_tokens. Each part's loss is normalised as its loss type
        normalises a micro-batch; the share scales it back to the whole micro-batch's normaliser, so
        the parts' gradients add up to the micro-batch's."""
        chunks = self._row_chunks(mb)
        if len(chunks) == 1:
            return [(mb, 1.0, 1.0)]
        rows = len(mb.advantages)
        tokens = max(float(mb.completion_mask.sum()), 1.0)
        parts = []
        for chunk in chunks:
            part = trim(mb.slice(slice(chunk.start, chunk.stop)))
            part_tokens = float(part.completion_mask.sum())
            if self.args.loss_type in ("dapo", "cispo"):
                share = 1.0  # already normalised by the generation batch's token count (num_items)
            elif self.args.loss_type == "bnpo":
                share = part_tokens / tokens
            else:  # grpo, dr_grpo: a mean over rows
                share = len(chunk) / rows
            parts.append((part, share, part_tokens / tokens))
        return parts

    def _row_chunks(self, mb: MicroBatch) -> list[range]:
        """Row ranges of `mb` for one forward pass each (max_forward_tokens)."""
        rows = len(mb.advantages)
        budget = self.args.max_forward_tokens
        if budget is None:
            return [range(rows)]
        P = mb.input_ids.shape[1] - mb.completion_ids.shape[1]
        prompts = mb.attention_mask[:, :P].sum(1).tolist()  # host syncs, once per micro-batch
        completions = mb.attention_mask[:, P:].sum(1).tolist()
        if not self.padding_free:  # a trimmed chunk keeps completion columns up to the longest mask
            completions = mb.completion_mask.sum(1).tolist()
        return token_chunks(prompts, completions, budget, packed=self.padding_free)

    def _next_micro_batch(self) -> MicroBatch:
        """The next micro-batch, generating a new batch whenever the previous is spent. A plain call,
        not a generator: one that an error (a reward function that raises) passed through would be
        closed, and every later `train()` on this trainer would stop at once."""
        if not self._pending:
            self._refill()
        return self._pending.pop(0)

    def _refill(self) -> None:
        """Generate and score one generation batch; queue its micro-batches for `num_iterations` passes."""
        c = self.args
        batch = self._generate_and_score()
        size = c.per_device_train_batch_size
        # Packed rows cost what their tokens cost: balance them, keeping rows per micro-batch equal
        # (bnpo normalises by each micro-batch's own tokens, so regrouping would change its objective).
        chunks = split_micro_batches(batch, size, balance=self.padding_free and c.loss_type != "bnpo")
        self._pending = [trim(mb) for _ in range(c.num_iterations) for mb in chunks]

    # ------------------------------------------------------------------ rollout and scoring
    def _generate_and_score(self) -> MicroBatch:
        c = self.args
        G = c.num_generations
        rows = self.sampler.next_batch()
        self._announce_epochs(self.sampler.epochs_begun)  # those the sampler could not foresee
        self._epochs_ending += len(self.sampler.epochs_ended)
        rollout = self._rollout_batch(rows)
        prompts, prompt_ids, completion_ids = rollout.prompts, rollout.prompt_ids, rollout.completion_ids
        finished = rollout.finished

        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": t}] if is_conversational(p) else t
                       for p, t in zip(prompts, texts)]
        columns = rollout.columns
        per_func = compute_rewards(self.reward_funcs, prompts, completions, completion_ids, columns,
                                   trainer_state=self.state)  # [N, K]
        rewards = combine_rewards(per_func, c.reward_weights)  # [N]
        advantages, _, group_std = atlas_kernels.group_advantages(rewards, G, scale=c.scale_rewards)

        p_ids, p_mask = left_pad(prompt_ids, self.tokenizer.pad_token_id)
        c_ids, c_mask = right_pad(completion_ids, self.tokenizer.pad_token_id)
        finished = torch.tensor(finished, dtype=torch.bool)
        if c.mask_truncated_completions:
            c_mask = c_mask * finished[:, None].long()
        batch = MicroBatch(
            input_ids=torch.cat([p_ids, c_ids], 1).to(self.device),
            attention_mask=torch.cat([p_mask, c_mask], 1).to(self.device),
            completion_ids=c_ids.to(self.device),
            completion_mask=c_mask.bool().to(self.device),
            advantages=advantages.to(self.device),
            old_logps=None, ref_logps=None,
            num_items=float(c_mask.sum()),
        )
        with self.memory.phase("reference"):
            batch.old_logps, batch.ref_logps = self._rollout_logps(batch)

        self.current_rewards = rewards
        lengths = torch.tensor([len(x) for x in completion_ids], dtype=torch.float32)
        self._generation_metrics = {
            "reward": float(torch.nanmean(rewards)),
            "reward_std": float(_nanstd(rewards)),  # over the batch, as TRL logs it
            "frac_reward_zero_std": float((group_std == 0).float().mean()),
            **reward_metrics(per_func, [name for name, _ in self.reward_funcs]),
            "completions/mean_length": float(lengths.mean()),
            "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float(1 - finished.float().mean()),
            **rollout.metrics,
        }
        # What reward functions report on their call (e.g. RIM: rim_rewards/<judge>, rationales).
        extra_metrics, tables = reward_reports(self.reward_funcs)
        self._generation_metrics.update(extra_metrics)
        if self.logger is not None and self.logger.enabled:
            # Stamped with the step that trains on these rows, as metrics.jsonl numbers it.
            append_reward_tables(c.output_dir, self.state.global_step + 1, tables)
            ckpt.note_run_files(c.output_dir, [f"{name}.jsonl" for name, rows in tables.items() if rows])
        if c.log_completions and self.logger is not None:
            self.logger.log_completions(self.state.global_step + 1, [
                {"prompt": p, "completion": t, "reward": float(r), "advantage": float(a)}
                for p, t, r, a in zip(prompts, texts, rewards, advantages)])
        return batch

    def _rollout_batch(self, rows: list[dict]) -> Rollout:
        """G completions for each row: plain sampling from the policy. A protocol that samples
        differently (the teacher's, atlas_fast.teaching) overrides this one method."""
        G = self.args.num_generations
        unique_ids = self._tokenize_prompts([row["prompt"] for row in rows])
        rows = [row for row in rows for _ in range(G)]  # each prompt G times, groups contiguous
        prompts = [row["prompt"] for row in rows]
        with self.memory.phase("generation"):
            completion_ids, finished = self._generate(prompts, unique_ids)
        columns = {k: [row[k] for row in rows] for k in rows[0] if k != "prompt"}
        return Rollout(prompts, [ids for ids in unique_ids for _ in range(G)], completion_ids, finished, columns)

    def _tokenize_prompts(self, prompts: list) -> list[list[int]]:
        texts = [render_prompt(p, self.tokenizer, **(self.args.chat_template_kwargs or {})) for p in prompts]
        enc = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        for text, ids in zip(texts, enc):
            if not ids:  # the first completion token would have no position to be scored from
                raise ValueError(f"a prompt tokenizes to no tokens ({text!r}); every prompt needs at least one")
        limit = self.args.max_prompt_length
        return [ids[-limit:] if limit else ids for ids in enc]  # keep the end: it holds the question

    def _generate(self, prompts: list, unique_prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[bool]]:
        """G completions per prompt (`prompts` is already repeated G times) and whether each finished."""
        c = self.args
        if self.rollout_func is not None:
            out = self.rollout_func(prompts, self)
            out = out["completion_ids"] if isinstance(out, dict) else out
            if len(out) != len(prompts):
                raise ValueError(f"rollout_func returned {len(out)} completions for {len(prompts)} prompts")
            completion_ids = [list(map(int, ids))[: c.max_completion_length] for ids in out]
            eos = self.rollout_stop_ids
            finished = [bool(ids) and ids[-1] in eos for ids in completion_ids]
        else:
            sampling = SamplingParams(max_tokens=c.max_completion_length, n=c.num_generations,
                                      temperature=c.temperature, top_p=c.top_p, top_k=c.top_k, min_p=c.min_p or 0.0,
                                      repetition_penalty=c.repetition_penalty)
            out = self.rollout.generate(unique_prompt_ids, sampling)
            completion_ids = out.completion_ids
            finished = [r == FINISH_STOP for r in out.finish_reasons]
        # Checked here, on host lists, so the log-prob kernels can skip their range check (a
        # device sync per micro-batch) and an id past the vocabulary never reaches a gather.
        vocab = self.model.config.vocab_size
        bad = sorted({i for ids in completion_ids for i in ids if not 0 <= i < vocab})
        if bad:
            raise ValueError(f"completion ids outside the model's vocabulary of {vocab}: {bad[:5]}")
        return completion_ids, finished

    @property
    def rollout_stop_ids(self) -> set[int]:
        return stop_ids(self.tokenizer, self.model)

    @torch.no_grad()
    def _rollout_logps(self, batch: MicroBatch):
        """Sampling-policy and reference log-probs for the whole generation batch."""
        c = self.args
        old = ref = None
        if not (c.uses_old_logps or c.beta != 0.0):
            return old, ref
        parts = self._logp_forwards(batch, c.per_device_train_batch_size)
        width = batch.completion_ids.shape[1]
        if c.uses_old_logps:
            old = self._batched_logps(self.model, parts, width)
        if c.beta != 0.0:
            if self.ref_model is None:  # PEFT: the base model is the reference
                with self.model.disable_adapter():
                    ref = self._batched_logps(self.model, parts, width)
            else:
                # A single forward lets an offloaded reference stream its layers behind the compute
                # instead of uploading first.
                with on_device(self.ref_model, self.device, forwards=len(parts)):
                    ref = self._batched_logps(self.ref_model, parts, width)
        return old, ref

    def _logp_forwards(self, batch: MicroBatch, size: int) -> list[MicroBatch]:
        """`batch` as the forwards of a log-prob pass, in row order: micro-batches of `size` rows,
        each in row chunks when it holds more than max_forward_tokens, and runs of them merged
        under it as the update merges them (the same shapes, so the same rounding)."""
        # A padded slice runs at its own width, not the generation batch's: its forward's size, and
        # max_forward_tokens, count the columns it computes. Packed rows hold no padding to drop.
        slices = [batch.slice(slice(i, i + size)) for i in range(0, len(batch.advantages), size)]
        slices = slices if self.padding_free else [trim(mb) for mb in slices]
        merged = [concat_micro_batches(slices[g.start:g.stop]) for g in self._merge_groups(slices)]
        return [part for mb in merged for part, _, _ in self._forward_parts(mb)]

    def _batched_logps(self, model, parts: list[MicroBatch], width: int) -> torch.Tensor:
        """Completion log-probs [rows, width] of the forwards in `parts` (from _logp_forwards)."""
        head = self.lm_head if model is self.model else self._fused_head(model)
        was_training = model.training
        _set_training(model, False)  # the sampling policy's and the reference's log-probs: no dropout
        out = [torch.nn.functional.pad(lp, (0, width - lp.shape[1])) for lp in self._logps_of(model, head, parts)]
        _set_training(model, was_training)
        return torch.cat(out)

    def _logps_of(self, model, head: LMHead | None, parts: list[MicroBatch]) -> list[torch.Tensor]:
        """Completion log-probs [rows, C] of each micro-batch in `parts` (C its own width); padded
        positions hold values the losses mask out."""
        out = []
        for mb in parts:
            with self._autocast():
                if head is not None:
                    out.append(self.kernels.fused_linear_logprobs(
                        self._completion_hidden(head, mb), head.weight, mb.completion_ids, bias=head.bias,
                        temperature=self.args.temperature, validate=False))
                else:
                    logits = self._completion_logits(model, mb)
                    out.append(self.kernels.selective_logprobs(logits, mb.completion_ids,
                                                               temperature=self.args.temperature, validate=False))
        return out

    def _fused_head(self, model) -> LMHead | None:
        """The model split for the fused LM head (`fused_lm_head`), or None to score its logits:
        heads that are more than a linear map (soft-capping, logit scaling, an adapter) say why."""
        if not self.args.fused_lm_head:
            return None
        # Hooks on the whole model's forward (accelerate's device maps) would be skipped by calling
        # its body alone. A frozen-model offload's are not needed: inside on_device() its non-layer
        # weights stay resident and its layers stream through hooks of their own.
        hooked = (model._forward_pre_hooks or model._forward_hooks) and frozen_offload(model) is None
        head = split_lm_head(model) if not hooked else (
            f"{type(model).__name__} has hooks on its forward (offload or device placement)")
        if isinstance(head, str):
            notes = self.__dict__.setdefault("_head_notes", set())  # once per reason, not per batch
            if head not in notes:
                notes.add(head)
                print(f"note: fused_lm_head: scoring logits instead: {head}", file=sys.stderr)
            return None
        return head

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, eval_dataset: Any = None) -> dict:
        c = self.args
        rows = self._eval_rows(eval_dataset)
        prompts = [r["prompt"] for r in rows]
        prompt_ids = self._tokenize_prompts(prompts)
        greedy = SamplingParams(max_tokens=c.max_completion_length, temperature=0.0)
        completion_ids = []
        for i in range(0, len(prompt_ids), c.per_device_eval_batch_size):
            completion_ids += self.rollout.generate(prompt_ids[i : i + c.per_device_eval_batch_size], greedy).completion_ids
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": t}] if is_conversational(p) else t
                       for p, t in zip(prompts, texts)]
        columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
        per_func = compute_rewards(self.reward_funcs, prompts, completions, completion_ids, columns, self.state)
        names = [name for name, _ in self.reward_funcs]
        metrics = {"eval/reward": float(torch.nanmean(combine_rewards(per_func, c.reward_weights)))}
        metrics.update({f"eval/{k}": v for k, v in reward_metrics(per_func, names).items()})
        metrics["eval/completions/mean_length"] = sum(map(len, completion_ids)) / max(len(completion_ids), 1)
        if self.compute_metrics is not None:
            pred = EvalPrediction(prompts, completions, {n: per_func[:, k].tolist() for k, n in enumerate(names)}, columns)
            metrics.update({f"eval/{k}": v for k, v in (self.compute_metrics(pred) or {}).items()})
        return self._report_eval(metrics)

    def _eval_rows(self, eval_dataset: Any = None) -> list[dict]:
        """The evaluation rows: `eval_dataset`, else the trainer's, cut to eval_max_samples."""
        dataset = load_dataset_any(eval_dataset) if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset (pass one to the trainer or to evaluate)")
        limit = self.args.eval_max_samples  # read no further than that: a stream may never end
        return [dict(r) for r in (itertools.islice(dataset, limit) if limit else dataset)]

    def _report_eval(self, metrics: dict) -> dict:
        """Log evaluation metrics and run the on_evaluate hook and callbacks."""
        self.control.should_evaluate = False
        self.log(metrics)
        self.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        self._event("on_evaluate", metrics=metrics)
        return metrics

    # ------------------------------------------------------------------ hooks, logging, saving
    def on_epoch_begin(self):
        """Called when the sampler starts a new pass over the train dataset."""

    def on_step_end(self, args, state, control, **kwargs):
        """Called after every optimizer step; `kwargs["metrics"]` holds the step's metrics."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        """Called after `evaluate()` with its metrics."""

    def claim_output_dir(self, resuming: bool = False) -> None:
        """Check `output_dir` once, before anything is written to it, and open the metrics log.
        A folder that holds another run is refused unless this run resumes it or
        `overwrite_output_dir=True` (which clears that run's files first)."""
        if self.logger is not None:
            return
        c = self.args
        ckpt.prepare_output_dir(c.output_dir, resuming=resuming, overwrite=c.overwrite_output_dir)
        self.logger = MetricsLogger(c.output_dir, report_to=c.report_to, run_name=c.run_name)
        for metrics, step in self._unwritten_logs:
            self.logger.log(metrics, step=step)
        self._unwritten_logs = []

    def log(self, metrics: dict) -> None:
        # Tensors and numpy values become Python numbers (or lists): log_history is saved in each
        # checkpoint, whose weights-only loader refuses numpy scalars.
        clean = {k: (v.tolist() if hasattr(v, "tolist") and not isinstance(v, (str, bytes)) else v)
                 for k, v in metrics.items()}
        record = {**clean, "step": self.state.global_step}
        self.state.log_history.append(record)
        if self.logger is None and ckpt.run_artifacts(self.args.output_dir):
            # Before train() (an evaluate() first) in a folder that holds a run: claiming it here, as
            # a new run, would refuse it, or clear it with overwrite_output_dir, when a following
            # train(resume_from_checkpoint=...) means to resume it. The record is written when train() claims it.
            self._unwritten_logs.append((clean, self.state.global_step))
        else:
            self.claim_output_dir()
            self.logger.log(clean, step=self.state.global_step)
        self._event("on_log", logs=clean)

    def _event(self, name: str, **kwargs) -> None:
        for cb in self.callbacks:
            handler = getattr(cb, name, None)
            if handler is None:
                continue
            result = handler(self.args, self.state, self.control, model=self.model, processing_class=self.tokenizer,
                             tokenizer=self.tokenizer, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, **kwargs)
            if isinstance(result, TrainerControl):
                self.control = result

    def save_model(self, path: str | Path | None = None) -> Path:
        path = Path(path or self.args.output_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path

    def _trainer_state(self, snapshot: dict | None = None) -> dict:
        """What a checkpoint holds besides the weights; `snapshot` replaces the parts that a
        failing step has already advanced (sampler, pending micro-batches, RNG)."""
        snapshot = snapshot or self._snapshot()
        state = {
            "global_step": self.state.global_step,
            "epoch": self.state.epoch,
            "log_history": self.state.log_history,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.lr_scheduler.state_dict(),
            "sampler": snapshot["sampler"],
            "pending": [mb.to_state() for mb in snapshot["pending"]],
            "epochs_ending": snapshot["epochs_ending"],
            "rng": snapshot["rng"],
            "num_tokens": self._num_tokens,
            "batch_geometry": self._batch_geometry(),
            "advantage_settings": self._advantage_settings(),
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.ref_model is not None and self.args.sync_ref_model:
            state["ref_model"] = self.ref_model.state_dict()  # it drifts with the policy
        return state

    def _batch_geometry(self) -> dict:
        """The settings that cut the prompt stream into generation batches and micro-batches."""
        c = self.args
        return {"num_generations": c.num_generations, "per_device_train_batch_size": c.per_device_train_batch_size,
                "micro-batches per generation batch": c.generation_steps,
                "gradient_accumulation_steps": c.gradient_accumulation_steps, "num_iterations": c.num_iterations}

    def _advantage_settings(self) -> dict:
        """The settings that turn rewards into the advantages stored with each micro-batch."""
        return {"scale_rewards": self.args.scale_rewards, "reward_weights": self.args.reward_weights}

    def _check_resumable(self, path: Path, state: dict) -> None:
        """Refuse a checkpoint this run cannot continue, before anything is loaded from it: its
        pending micro-batches were made under settings (batch cut, reward scaling, log-probs) that
        this run's differ from. Batch settings changed at a generation boundary only warn."""
        pending = state["pending"]
        for what, saved, now in (("reward", state.get("advantage_settings", {}), self._advantage_settings()),
                                 ("batch", state.get("batch_geometry", {}), self._batch_geometry())):
            changed = [f"{k} {v!r} -> {now[k]!r}" for k, v in saved.items() if k in now and now[k] != v]
            if changed and pending:
                raise ValueError(f"Cannot resume {path} with changed {what} settings ({'; '.join(changed)}): the "
                                 f"checkpoint holds {len(pending)} micro-batches of a generation batch made with the "
                                 "saved ones. Resume with them until that generation batch is spent, or start a new run")
            if changed and what == "batch":
                warnings.warn(f"Resuming {path} with changed batch settings ({'; '.join(changed)}): training continues "
                              "from the same place in the prompt order, but not as the saved run would have",
                              UserWarning, stacklevel=4)
        # Micro-batches generated before the save carry the log-probs that run's settings needed;
        # a loss that now needs others would fail at its first step with a message about the loss.
        for field, needed, setting in (("ref_logps", self.args.beta != 0.0, f"beta={self.args.beta}"),
                                       ("old_logps", self.args.uses_old_logps, "these settings (num_iterations > 1, "
                                        "or steps_per_generation > gradient_accumulation_steps)")):
            if needed and any(mb.get(field) is None for mb in pending):
                raise ValueError(f"Cannot resume {path} with {setting}: the checkpoint holds micro-batches generated "
                                 f"without {field.replace('_', ' ')} (its run did not need them); resume with that run's "
                                 "settings until its generation batch is spent, or start a new run")

    def _snapshot(self) -> dict:
        # A few ints, a list of references to immutable micro-batches and the RNG states: cheap
        # enough to take after every step.
        return {"sampler": self.sampler.state_dict(), "pending": list(self._pending), "rng": ckpt.capture_rng_state(),
                "epochs_ending": self._epochs_ending}

    def _save_checkpoint(self, snapshot: dict | None = None) -> Path:
        path = ckpt.save_checkpoint(self.args.output_dir, self.state.global_step, self.model, self.tokenizer,
                                    self._trainer_state(snapshot), save_total_limit=self.args.save_total_limit)
        self._event("on_save")
        return path

    def checkpoint_to_resume(self, where: str | bool) -> Path:
        """The checkpoint that `resume_from_checkpoint=where` names, checked to load into this model."""
        path = ckpt.resume_target(self.args.output_dir, where)
        ckpt.check_checkpoint(path, self.model)
        return path

    def _resume(self, where: str | bool) -> None:
        path = self.checkpoint_to_resume(where)
        state = ckpt.load_trainer_state(path, self.model)
        self._check_resumable(path, state)  # refusals first, while the model still holds its own weights
        self.sampler.load_state_dict(state["sampler"])  # refuses other data or another seed: before the weights
        ckpt.load_weights(path, self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["scheduler"])
        self._pending = [MicroBatch(**{k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                                       for k, v in mb.items()}) for mb in state["pending"]]
        if "ref_model" in state and self.ref_model is not None:
            self.ref_model.load_state_dict(state["ref_model"])
        self._epochs_ending = state.get("epochs_ending", 0)
        self.state.global_step = state["global_step"]
        self.state.epoch = state["epoch"]
        self.state.log_history = list(state["log_history"])
        self._num_tokens = state.get("num_tokens", 0)
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng_state(state["rng"])

    def _stop_on_non_finite(self, what: str) -> None:
        # Nothing has been stepped with this loss yet: the weights, optimizer and schedule in memory
        # are the last good step's. The sampler, the pending micro-batches and the RNG have moved on
        # (this step generated): save them as that step ended, so a resume trains on the same rows.
        self.optimizer.zero_grad(set_to_none=True)
        path = ckpt.checkpoint_path(self.args.output_dir, self.state.global_step)
        if not ckpt.is_complete(path):  # that step's own checkpoint already holds this state
            path = self._save_checkpoint(self._last_good)
        raise FloatingPointError(
            f"{what} at step {self.state.global_step + 1}; training stopped and the last good "
            f"state was saved to {path}. Check the rewards, the learning rate and the data."
        )

    def _maybe_sync_ref_model(self) -> None:
        c = self.args
        if not (c.sync_ref_model and self.ref_model is not None and self.state.global_step % c.ref_model_sync_steps == 0):
            return
        with torch.no_grad():
            for ref_p, p in zip(self.ref_model.parameters(), self.model.parameters()):
                ref_p.mul_(1 - c.ref_model_mixup_alpha).add_(p.detach().to(ref_p.device), alpha=c.ref_model_mixup_alpha)

    def _autocast(self):
        if self.autocast_dtype is not None:
            return torch.autocast(self.device.type, dtype=self.autocast_dtype)
        return contextlib.nullcontext()


# ---------------------------------------------------------------------- plain functions
def _nanstd(x: torch.Tensor) -> torch.Tensor:
    x = x[~torch.isnan(x)]
    return x.std() if x.numel() > 1 else torch.zeros(())


# Losses normalised by the rows of their micro-batch (a mean of per-sequence values): the sum over
# micro-batches of equal row counts is a merged pass's loss times their number.
ROW_MEAN_LOSSES = ("grpo", "dr_grpo")
# What the reward runner passes besides the dataset's columns.
REWARD_ARGUMENTS = {"prompts", "completions", "completion_ids", "trainer_state"}


def check_reward_columns(reward_funcs, dataset, label: str, extra=()) -> None:
    """A reward function's required arguments must be supplied: checked before the first step
    rather than discovered after a generation (a dataset without the column is a data mistake).
    `extra`: columns that the rollout adds (a subclass's `rollout_columns`)."""
    columns = getattr(dataset, "column_names", None)
    if dataset is None or columns is None:  # a stream whose columns are unknown until read
        return
    for name, func in reward_funcs:
        try:
            params = inspect.signature(func).parameters.values()
        except (TypeError, ValueError):
            continue
        required = {p.name for p in params if p.default is inspect.Parameter.empty
                    and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
        missing = sorted(required - REWARD_ARGUMENTS - set(columns) - set(extra))
        if missing:
            raise ValueError(f"reward function {name!r} needs the column(s) {missing}, which the {label} dataset "
                             f"lacks (its columns: {', '.join(columns)})")


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def _set_training(model: torch.nn.Module, mode: bool) -> None:
    """model.train(mode), skipped when every module is in that mode already: train() sets the flag
    on each of the ~300 modules of a 0.5B model through nn.Module.__setattr__, host time that a
    launch-bound step pays at every micro-batch and log-prob pass, while reading the flags costs a
    small part of it. Every module, not the root alone: a PEFT wrapper made from a model in eval
    mode is in train mode over base layers that are not."""
    if any(m.training != mode for m in model.modules()):
        model.train(mode)


def _refuse_several_processes() -> None:
    """One process trains: under torchrun every rank would train the whole run alone, with the
    same seed and rows, on the same GPU, and write the same output_dir."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = max(world, torch.distributed.get_world_size())
    if world > 1:
        raise ValueError(f"atlas-fast trains in one process, and this is one of {world} (torchrun or WORLD_SIZE): "
                         "each would train the whole run alone and write the same output_dir; launch it with "
                         "python, and fit memory with gradient_checkpointing, offload_untrained_models or LoRA")
