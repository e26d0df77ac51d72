"""The decode batch: one slot per cache row, with the per-sequence state that lives on the device.

Slots past the live sequences are padding (finished from the start, writing to a dummy output
row), so the batch always has a bucket's static size. Finished sequences stay in their slot, their
tokens replaced by padding, until the next compaction moves the live ones to the front.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import KVCache


@dataclass
class DecodeBatch:
    # With CUDA graphs these two are views of the graphs' input buffers (EngineBackend._graph_inputs):
    # written in place by the sampler, read by the next replay with no copy.
    tokens: torch.Tensor  # [B] long: the token each slot feeds next
    positions: torch.Tensor  # [B] long: that token's position
    finished: torch.Tensor  # [B] bool
    rows: torch.Tensor  # [B] long: output row of each slot; N (a dummy row) for padding
    seen: torch.Tensor | None  # [B, V + 1] bool: tokens seen so far (repetition penalty); column V absorbs padding
    prompt_lens: list[int]  # [B] on the host: the attention span needs the longest live prompt, without a sync
    live: list[bool]  # [B] on the host: slots whose sequence was unfinished at the last check

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def span_needed(self, step: int) -> int:
        """Cache positions the step feeding token `step - 1` must see (its own included)."""
        return max((n for n, a in zip(self.prompt_lens, self.live) if a), default=1) + step


def new_batch(prompt_lens: list[int], n: int, first_tokens: torch.Tensor, size: int, seen: torch.Tensor | None,
              pad_id: int) -> DecodeBatch:
    """Rows i*n .. i*n+n-1 sample prompt i; `first_tokens` [N] were drawn from the prefill logits."""
    N = len(prompt_lens) * n
    device = first_tokens.device
    lens = [length for length in prompt_lens for _ in range(n)] + [0] * (size - N)
    pad = size - N
    return DecodeBatch(
        tokens=torch.cat([first_tokens, first_tokens.new_full((pad,), pad_id)]),
        positions=torch.tensor(lens, dtype=torch.long, device=device),  # token 0 sits right after its prompt
        finished=torch.arange(size, device=device) >= N,
        rows=torch.cat([torch.arange(N, device=device), torch.full((pad,), N, device=device)]),
        seen=seen,
        prompt_lens=lens,
        live=[True] * N + [False] * pad,
    )


def compact(batch: DecodeBatch, keep: list[int], size: int, cache: KVCache, span: int, pad_id: int,
            dummy_row: int) -> DecodeBatch:
    """Slots `keep` (ascending) move to the front of a batch of `size` slots, their cache rows too."""
    device = batch.tokens.device
    index = torch.tensor(keep, dtype=torch.long, device=device)
    pad = size - len(keep)
    cache.compact(index, span)

    def take(x: torch.Tensor, fill) -> torch.Tensor:
        kept = x[index]
        return torch.cat([kept, kept.new_full((pad, *kept.shape[1:]), fill)])

    return DecodeBatch(
        tokens=take(batch.tokens, pad_id),
        positions=take(batch.positions, 0),
        finished=take(batch.finished, True),
        rows=take(batch.rows, dummy_row),
        seen=take(batch.seen, False) if batch.seen is not None else None,
        prompt_lens=[batch.prompt_lens[i] for i in keep] + [0] * pad,
        live=[True] * len(keep) + [False] * pad,
    )
