"""Sampling on the device: logits in, token ids (and their log-probs) out, never a host sync.

The processed distribution, in vLLM's order and meanings:
  1. repetition penalty on every token seen in the prompt or completion so far: a logit l becomes
     l / r if l > 0 else l * r;
  2. EOS and stop ids are forbidden while fewer than `min_tokens` tokens were generated;
  3. greedy stops here (argmax); otherwise divide by the temperature,
  4. keep tokens whose probability is >= min_p times the largest one (before top-k/top-p, as vLLM
     applies it; transformers applies it last, which differs when top_p is set too),
  5. keep the top_k largest logits (ties at the k-th value kept),
  6. keep the smallest set of most likely tokens whose probability reaches top_p;
then sample from the softmax of what is left. The reported log-prob of a token is its log-prob
under this processed distribution (vLLM's "processed_logprobs").

Draws use the exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. picks token i with
probability p_i, in one pass over the vocabulary and with no sort when top-k/top-p are off.
"""
from __future__ import annotations

import torch

from .. import SamplingParams

NEG_INF = float("-inf")


def apply_penalties(logits: torch.Tensor, params: SamplingParams, step: int, seen: torch.Tensor | None,
                    stop_mask: torch.Tensor | None) -> torch.Tensor:
    """logits [B, V] float32 -> penalised logits [B, V] (steps 1-2). `seen` [B, V] bool; `step` is
    how many tokens each row has generated before this one."""
    if params.repetition_penalty != 1.0 and seen is not None:
        r = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    if step < params.min_tokens and stop_mask is not None:
        logits = logits.masked_fill(stop_mask, NEG_INF)
    return logits


def apply_filters(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Penalised logits [B, V] -> temperature-scaled logits with filtered tokens at -inf (steps 3-6)."""
    logits = logits / params.temperature
    V = logits.shape[-1]
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, NEG_INF)
    if 0 < params.top_k < V:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V]
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability of the strictly more likely tokens
        drop_sorted = before >= params.top_p  # the first token is always kept (before = 0)
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, NEG_INF)
    return logits


def process(logits: torch.Tensor, params: SamplingParams, step: int, seen: torch.Tensor | None = None,
            stop_mask: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] -> the processed logits [B, V] float32 whose softmax is sampled."""
    logits = apply_penalties(logits.float(), params, step, seen, stop_mask)
    return logits if params.greedy else apply_filters(logits, params)


def draw(processed: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """processed [B, V] -> token ids [B] (argmax when greedy)."""
    if params.greedy:
        return processed.argmax(-1)
    probs = processed.softmax(-1)  # [B, V]; filtered tokens are exactly 0
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(1e-30)  # E > 0: 0/E stays 0
    return (probs / race).argmax(-1)


def chosen_logprobs(processed: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(processed)[tokens]: [B] float32, <= 0."""
    return processed.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


def temperature_only(params: SamplingParams, step: int, stop_mask: torch.Tensor | None, vocab: int) -> bool:
    """Whether this step's distribution is plain softmax(logits / T): no filter, no penalty active."""
    return (not params.greedy and not 0 < params.top_k < vocab and params.top_p >= 1.0 and params.min_p <= 0.0
            and params.repetition_penalty == 1.0 and (step >= params.min_tokens or stop_mask is None))


def sample(logits: torch.Tensor, params: SamplingParams, step: int, seen: torch.Tensor | None,
           stop_mask: torch.Tensor | None, generator: torch.Generator | None,
           want_logprobs: bool, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One decode step's tokens [B] and, if asked, their log-probs [B]. With `seed` (a fresh one per
    step) a temperature-only step runs the one-pass Triton sampler (sample_kernel.py) instead."""
    if seed is not None and temperature_only(params, step, stop_mask, logits.shape[-1]):
        from .sample_kernel import sample_tokens

        tokens, logps = sample_tokens(logits, params.temperature, seed)
        return tokens, logps if want_logprobs else None
    processed = process(logits, params, step, seen, stop_mask)
    tokens = draw(processed, params, generator)
    return tokens, chosen_logprobs(processed, tokens) if want_logprobs else None
