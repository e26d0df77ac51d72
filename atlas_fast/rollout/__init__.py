"""Generation: token ids in, token ids out, behind one interface and four backends.

The trainer (and the teacher-student protocol, and anything else that samples) asks a
`RolloutBackend` for completions of prompt token ids under `SamplingParams` and gets a
`RolloutOutput`; after each optimizer step it calls `update_weights(model)`. A backend knows
nothing of rewards, chat templates or the loss.

    auto         `engine` when CUDA is available and the engine knows the architecture, else `hf`
    hf           transformers `generate` (dynamic cache): the reference, works everywhere
    engine       our decoder over the policy's own parameters (KV cache, CUDA graphs)
    vllm_server  a client of a running `vllm serve` (OpenAI-compatible + weight transfer)
    vllm         vLLM in-process, colocated, with sleep mode

Backends are imported only when chosen, so the base install needs none of vLLM.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

BACKENDS = ("auto", "hf", "engine", "vllm_server", "vllm")
FINISH_STOP = "stop"  # ended on EOS or a stop id, which is kept as the last completion token
FINISH_LENGTH = "length"  # ran into max_tokens


GREEDY_BELOW = 1e-5  # vLLM's sampling epsilon: lower temperatures decode greedily


@dataclass(frozen=True)
class SamplingParams:
    """How to sample; vLLM's names and meanings. `temperature == 0` (or below 1e-5, as in vLLM) means greedy."""

    max_tokens: int
    n: int = 1  # completions per prompt, returned contiguously
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0  # EOS and stop ids are suppressed before this many tokens
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's EOS ids
    ignore_eos: bool = False  # the model's EOS ids do not stop (explicit stop ids still do), as in vLLM
    logprobs: bool = False  # return the sampler's log-prob of each chosen token
    seed: int | None = None

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"SamplingParams: {msg}")

        need(isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens!r}")
        need(isinstance(self.n, int) and self.n >= 1, f"n must be >= 1, got {self.n!r}")
        need(math.isfinite(self.temperature) and self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(isinstance(self.top_k, int) and self.top_k >= -1, f"top_k must be >= -1, got {self.top_k!r}")
        need(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        need(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        need(0 <= self.min_tokens <= self.max_tokens, f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        need(all(t >= 0 for t in self.stop_token_ids), f"stop_token_ids must be token ids (>= 0), got {self.stop_token_ids}")

    @property
    def greedy(self) -> bool:
        # As vLLM decides it: below 1e-5 the division by the temperature only risks overflow (to NaN
        # log-probs at ~1e-38) where the distribution is argmax to float precision anyway.
        return self.temperature < GREEDY_BELOW


@dataclass
class RolloutOutput:
    """Completions of P prompts x n samples, prompt i's samples at rows i*n .. i*n + n - 1."""

    completion_ids: list[list[int]]  # cut after the first EOS / stop id (kept), never padded
    finish_reasons: list[str]  # FINISH_STOP or FINISH_LENGTH, per row
    logprobs: list[list[float]] | None = None  # the sampler's log-prob per completion token, if asked
    metrics: dict[str, float] = field(default_factory=dict)  # backend timings, for the logs

    def __post_init__(self) -> None:
        if len(self.finish_reasons) != len(self.completion_ids):
            raise ValueError("RolloutOutput: one finish reason per completion")
        if self.logprobs is not None and [len(x) for x in self.logprobs] != [len(x) for x in self.completion_ids]:
            raise ValueError("RolloutOutput: one log-prob per completion token")


@runtime_checkable
class RolloutBackend(Protocol):
    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> RolloutOutput:
        """`sampling.n` completions for each prompt, grouped by prompt."""

    def update_weights(self, model: torch.nn.Module) -> None:
        """Sample from `model`'s current weights from now on (called after each optimizer step)."""

    def close(self) -> None:
        """Release what the backend holds (caches, connections, processes)."""


def resolve_backend(name: str, model: torch.nn.Module) -> str:
    """The concrete backend `name` stands for. `auto` picks our engine on a GPU: it decoded 25-45x
    faster than `generate` on an H200 (benchmarks/RESULTS.md); on the CPU, where nothing is
    captured in graphs, `generate` is the reference and stays the default."""
    if name != "auto":
        return name
    if not torch.cuda.is_available():
        return "hf"
    from .engine.model import resolve_decoder

    try:
        resolve_decoder(model)
    except NotImplementedError:
        return "hf"  # an architecture the engine does not know
    return "engine"


def build_backend(name: str, model: torch.nn.Module, tokenizer: Any, **options: Any) -> RolloutBackend:
    """The backend called `name`, over `model` (which it may read in place) and `tokenizer`.

    `options` are the backend's own keyword arguments (a server URL, timeouts, cache sizes);
    the trainer reads them from its config in one place."""
    name = resolve_backend(name, model)
    if name == "hf":
        from .hf import HFBackend

        return HFBackend(model, tokenizer, **options)
    if name == "engine":
        from .engine import EngineBackend

        return EngineBackend(model, tokenizer, **options)
    if name == "vllm_server":
        from .vllm_server import VLLMServerBackend

        return VLLMServerBackend(model, tokenizer, **options)
    if name == "vllm":
        from .vllm_colocated import VLLMColocatedBackend

        return VLLMColocatedBackend(model, tokenizer, **options)
    raise ValueError(f"rollout backend must be one of {BACKENDS}, got {name!r}")


# ---------------------------------------------------------------------- helpers every backend shares
def stop_ids(tokenizer: Any, model: torch.nn.Module | None = None, extra: Sequence[int] = ()) -> set[int]:
    """EOS ids from the model's generation config and the tokenizer, plus `extra`."""
    ids: set[int] = set(int(t) for t in extra)
    gen_cfg = getattr(model, "generation_config", None)
    for source in (getattr(gen_cfg, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(s) for s in source)
    return ids


def check_stop_ids(sampling: SamplingParams, vocab_size: int) -> None:
    """An explicit stop id the model cannot produce is a mistake in the request: say so."""
    outside = [t for t in sampling.stop_token_ids if t >= vocab_size]
    if outside:
        raise ValueError(f"stop_token_ids {outside} are outside the model's vocabulary of {vocab_size} tokens")


def cut_at_stop(ids: Sequence[int], stops: set[int]) -> tuple[list[int], str]:
    """Keep tokens up to and including the first stop id. A row without one ran to its length and
    holds only sampled tokens (generate pads rows only after they stop), pad ids included."""
    out: list[int] = []
    for tok in ids:
        out.append(int(tok))
        if tok in stops:
            return out, FINISH_STOP
    return out, FINISH_LENGTH


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


__all__ = ["BACKENDS", "FINISH_LENGTH", "FINISH_STOP", "RolloutBackend", "RolloutOutput", "SamplingParams",
           "build_backend", "cut_at_stop", "resolve_backend", "left_pad", "resolve_rollout_func", "right_pad", "stop_ids"]
