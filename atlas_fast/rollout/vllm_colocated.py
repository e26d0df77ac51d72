"""The `vllm` backend: vLLM in this process (colocated with the trainer), with sleep mode.

vLLM's engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, one worker in this process), so
a weight update hands it the policy's own tensors: no file, no socket, no copy beyond vLLM's own
parameters. It starts from random ("dummy") weights built from the policy's config, so a policy
built in memory needs no checkpoint on disk; the policy's weights are loaded before the first
generation and again after every update.

Sleep mode (CUDA only; vLLM ignores it on CPU): after each generation the engine sleeps at level
2, freeing its weights and KV cache for the optimizer step; the next generation wakes it and
reloads the weights from the policy, which it has to do after an update anyway.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any, Sequence

import torch

from . import RolloutOutput, SamplingParams, stop_ids
from .vllm_common import VLLM_MISSING, check_prompts, expand_greedy, finish, policy_weights, sampling_fields

EXTENSION = "atlas_fast.rollout.vllm_worker_ext.WeightReloadExtension"


class VLLMColocatedBackend:
    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, gpu_memory_utilization: float = 0.3,
                 enable_sleep_mode: bool | None = None, max_model_len: int | None = None,
                 dtype: str | None = None, kv_cache_memory_bytes: int | None = None, seed: int = 0,
                 enforce_eager: bool | None = None, **llm_kwargs: Any):
        try:
            import vllm  # noqa: F401
        except ImportError as err:
            raise ImportError(f"rollout backend 'vllm': {VLLM_MISSING}") from err
        # Must be set before the engine is built: the engine core then runs in this process and
        # collective_rpc hands our tensors to the worker as they are.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = stop_ids(tokenizer, model)
        cuda = next(model.parameters()).is_cuda
        self.sleep_mode = cuda if enable_sleep_mode is None else bool(enable_sleep_mode)
        self._config_dir = write_config_dir(model, tokenizer)
        options = dict(
            model=self._config_dir, tokenizer=self._config_dir, load_format="dummy",
            dtype=dtype or dtype_name(next(model.parameters()).dtype),
            gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.sleep_mode,
            max_model_len=max_model_len, kv_cache_memory_bytes=kv_cache_memory_bytes, seed=seed,
            enforce_eager=(not cuda) if enforce_eager is None else enforce_eager,
            worker_extension_cls=EXTENSION, distributed_executor_backend="uni",
            logprobs_mode="processed_logprobs", max_logprobs=-1, generation_config="vllm",
        )
        options.update(llm_kwargs)
        self.llm = LLM(**{k: v for k, v in options.items() if v is not None})
        self._stale = True  # vLLM holds dummy weights until the first load
        self._asleep = False
        self.last_sync_s: float | None = None

    # ------------------------------------------------------------------ weights
    def update_weights(self, model: torch.nn.Module) -> None:
        """Mark the engine's weights stale; they are read from `model` right before the next
        generation (an update without a generation in between costs nothing)."""
        self.model = model
        self._stale = True

    def _load(self) -> None:
        start = time.perf_counter()
        with policy_weights(self.model) as pairs:
            self.llm.collective_rpc("atlas_fast_load_named_tensors", args=(pairs,))
        self.llm.reset_prefix_cache()  # no KV block computed with the old weights is reused
        self._stale = False
        self.last_sync_s = time.perf_counter() - start

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    # ------------------------------------------------------------------ generation
    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> RolloutOutput:
        import vllm

        check_prompts(prompt_ids)
        start = time.perf_counter()
        self._wake()
        if self._stale:
            self._load()
        prompts, n = expand_greedy(prompt_ids, sampling)
        fields = {**sampling_fields(sampling, self.eos_ids), "n": n}
        if sampling.seed is None:
            params: Any = vllm.SamplingParams(**fields)
        else:  # one seed per prompt, as the server backend does: prompts stay independent
            params = [vllm.SamplingParams(**{**fields, "seed": sampling.seed + i}) for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        stops = set(fields["stop_token_ids"])
        ids, reasons, logps = [], [], [] if sampling.logprobs else None
        for request in outputs:
            for completion in sorted(request.outputs, key=lambda c: c.index):
                out, why = finish(completion.token_ids, completion.finish_reason, stops)
                ids.append(out)
                reasons.append(why)
                if logps is not None:
                    chosen = [step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids)]
                    logps.append([float(v) for v in chosen[: len(out)]])
        metrics = {"rollout/vllm_s": time.perf_counter() - start}
        if self.sleep_mode:
            self.llm.sleep(level=2)  # weights and KV cache freed for training; reloaded on wake
            self._asleep, self._stale = True, True
        return RolloutOutput(ids, reasons, logps, metrics=metrics)

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if shutdown is not None and hasattr(shutdown, "shutdown"):
                shutdown.shutdown()
        if getattr(self, "_config_dir", None):
            shutil.rmtree(self._config_dir, ignore_errors=True)
            self._config_dir = None


def write_config_dir(model: torch.nn.Module, tokenizer: Any) -> str:
    """A folder with the policy's config, generation config and tokenizer: all vLLM needs to build
    the model (with dummy weights). A PEFT policy contributes its base model's config."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    path = tempfile.mkdtemp(prefix="atlas-fast-vllm-")
    base.config.save_pretrained(path)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
