"""What the two vLLM backends share: sampling settings in vLLM's terms, and the policy's weights
under the names a vLLM model loads (PEFT adapters merged)."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from . import FINISH_LENGTH, FINISH_STOP, SamplingParams, cut_at_stop

VLLM_MISSING = ("vLLM is not installed in this environment: pip install atlas-fast[vllm] "
                "(or run a server from its own virtualenv: make vllm-env, then atlas-fast vllm-serve)")


def sampling_fields(sampling: SamplingParams, eos_ids: set[int]) -> dict[str, Any]:
    """SamplingParams -> vLLM's sampling fields (the OpenAI completions body and
    `vllm.SamplingParams` take the same names). The stop ids are sent explicitly, EOS included,
    so the server stops where the trainer's tokenizer and generation config say, whatever
    generation config the server loaded; `ignore_eos` drops the EOS ids and keeps explicit ones."""
    stops = (set() if sampling.ignore_eos else set(eos_ids)) | set(sampling.stop_token_ids)
    return dict(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else -1,
        min_p=sampling.min_p,
        repetition_penalty=sampling.repetition_penalty,
        max_tokens=sampling.max_tokens,
        min_tokens=sampling.min_tokens,
        stop_token_ids=sorted(stops),
        ignore_eos=sampling.ignore_eos,
        seed=sampling.seed,
        logprobs=0 if sampling.logprobs else None,  # 0: the chosen token's own log-prob only
    )


def expand_greedy(prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> tuple[list[list[int]], int]:
    """vLLM rejects n > 1 with greedy decoding ("n must be 1 when using greedy sampling"): send
    each prompt n times with n = 1 instead. Returns (prompts to send, n per request)."""
    prompts = [list(map(int, p)) for p in prompt_ids]
    if sampling.greedy and sampling.n > 1:
        return [p for p in prompts for _ in range(sampling.n)], 1
    return prompts, sampling.n


def check_prompts(prompt_ids: Sequence[Sequence[int]]) -> None:
    if not len(prompt_ids):
        raise ValueError("generate: no prompts")
    for i, p in enumerate(prompt_ids):
        if not len(p):
            raise ValueError(f"generate: prompt {i} is empty (vLLM needs at least one token)")


def finish(ids: Sequence[int], reason: str | None, stops: set[int]) -> tuple[list[int], str]:
    """One completion in the interface's terms: cut after the first stop id (kept), as every
    backend does, and vLLM's finish reason mapped; a request vLLM aborted is an error. `stops`
    are the ids the request was sent with (no EOS ids under ignore_eos)."""
    if reason not in ("stop", "length", None):
        raise RuntimeError(f"vLLM finished a completion with reason {reason!r}")
    out, why = cut_at_stop(ids, stops)
    return out, FINISH_STOP if why == FINISH_STOP or reason == "stop" else FINISH_LENGTH


# ---------------------------------------------------------------------- the policy's weights
def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_adapter")


def vllm_name(name: str, adapter_prefix: str | None = None) -> str | None:
    """A parameter name of the (possibly PEFT-wrapped) policy -> its checkpoint name, or None for
    a tensor vLLM does not hold (adapter weights, the copy kept by modules_to_save)."""
    if adapter_prefix and adapter_prefix in name:
        return None
    if "original_module" in name:
        return None
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    return name.replace("modules_to_save.default.", "")


@contextlib.contextmanager
def policy_weights(model: torch.nn.Module, dtype: torch.dtype | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """(checkpoint name, tensor) for every weight vLLM holds, in parameter order. Tied weights
    come once (named_parameters dedups them, and vLLM skips a tied head's name anyway). A PEFT
    policy is merged for the duration and unmerged after, so vLLM needs no LoRA support. Tensors
    are the parameters themselves (no copy) unless `dtype` asks for a cast."""
    peft = is_peft(model)
    prefix = getattr(model, "prefix", "lora_") if peft else None
    if peft:
        model.merge_adapter()
    try:
        pairs = []
        for name, param in model.named_parameters():
            target = vllm_name(name, prefix)
            if target is not None:
                t = param.detach()
                pairs.append((target, t if dtype is None or t.dtype == dtype else t.to(dtype)))
        yield pairs
    finally:
        if peft:
            model.unmerge_adapter()


def parse_dtype(name: Any) -> torch.dtype | None:
    """vLLM reports dtypes as "torch.bfloat16" or "bfloat16"."""
    if isinstance(name, torch.dtype):
        return name
    if not isinstance(name, str):
        return None
    value = getattr(torch, name.removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) else None
