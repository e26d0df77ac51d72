"""Generation: token ids in, token ids out.

A rollout engine turns prompt token ids into completion token ids and knows nothing of
rewards, chat templates or the loss. `HFGenerator` wraps `model.generate`; faster engines (our
CUDA-graph decoder, a vLLM server) implement the same two methods. A user `rollout_func` can
replace generation entirely (multi-turn or tool-using rollouts, fixed completions in tests).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    greedy: bool = False


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> list[list[int]]:
        """One completion per prompt (callers repeat prompts for groups), each cut after its EOS."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights."""


def cut_at_eos(ids: Sequence[int], eos_ids: set[int], pad_id: int | None) -> list[int]:
    """Keep tokens up to and including the first EOS; drop trailing padding of unfinished rows."""
    out: list[int] = []
    for tok in ids:
        out.append(int(tok))
        if tok in eos_ids:
            return out
    while out and pad_id is not None and pad_id not in eos_ids and out[-1] == pad_id:
        out.pop()
    return out


def eos_token_ids(tokenizer: Any, model: torch.nn.Module | None = None) -> set[int]:
    ids: set[int] = set()
    gen_cfg = getattr(model, "generation_config", None)
    for source in (getattr(gen_cfg, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(s) for s in source)
    return ids


class HFGenerator:
    """Sampling through `model.generate` with a dynamic KV cache."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, batch_size: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_ids = eos_token_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model  # generates with the live policy: nothing to copy

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> list[list[int]]:
        model = self.model
        was_training = model.training
        model.eval()  # no dropout while sampling
        try:
            out: list[list[int]] = []
            step = self.batch_size or len(prompt_ids) or 1
            for start in range(0, len(prompt_ids), step):
                out.extend(self._generate_chunk(prompt_ids[start : start + step], sampling))
            return out
        finally:
            model.train(was_training)

    def _generate_chunk(self, prompt_ids, sampling: SamplingParams) -> list[list[int]]:
        device = next(self.model.parameters()).device
        ids, mask = left_pad(prompt_ids, self.pad_id, device)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=sampling.max_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids) or None,
            use_cache=True,  # gradient checkpointing switches it off for training; decoding needs it
        )
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(
                do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                top_k=sampling.top_k or None, min_p=sampling.min_p,
                repetition_penalty=sampling.repetition_penalty,
            )
        seqs = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        completions = seqs[:, ids.shape[1] :].tolist()  # host sync: the ids are needed as text next
        return [cut_at_eos(c, self.eos_ids, self.pad_id) for c in completions]


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"):
    """[N] ragged ids -> ids [N, L] and mask [N, L], padded on the left (the decoding side)."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"):
    """[N] ragged ids -> ids [N, L] and mask [N, L], padded on the right."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), max(width, 1)), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), max(width, 1)), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def resolve_rollout_func(spec: Any) -> Callable | None:
    """A callable, or "package.module:function"."""
    if spec is None or callable(spec):
        return spec
    if isinstance(spec, str) and ":" in spec:
        module, _, name = spec.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"rollout_func {spec!r} could not be imported: {exc}") from exc
    raise ValueError(f"rollout_func must be a callable or 'module:function', got {spec!r}")
