"""CUDA graphs of the decode step, one per (batch bucket, attention span), captured lazily.

A decode step of a 24-layer model is 250-900 small kernels; launched one by one from Python it takes
milliseconds of CPU time while the GPU needs about one. Replaying a captured graph launches them all
at once. Shapes must be static, so the batch is padded up to a bucket (finished rows leave by
compaction into a smaller bucket). With SDPA attention the span of the cache it reads is rounded up
to a step, one graph per span; the Triton attention reads each row's own length, so its step has
one span (the cache length) and one graph per bucket. All graphs share one memory pool: they never
run at the same time.
"""
from __future__ import annotations

from typing import Callable

import torch

StepFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (tokens [B], positions [B], span) -> logits [B, V]


def batch_bucket(m: int) -> int:
    """1, 2, 4, 8, then multiples of 16 (nano-vllm's ladder): at most 15 padded rows above 8."""
    for b in (1, 2, 4, 8):
        if m <= b:
            return b
    return -(-m // 16) * 16


def round_up(x: int, step: int) -> int:
    return -(-x // step) * step


class DecodeGraphs:
    """Replays `step` from static input buffers; captures each (batch, span) shape on first use."""

    def __init__(self, step: StepFn, max_rows: int, device: torch.device):
        self.step = step
        self.tokens = torch.zeros(max_rows, dtype=torch.long, device=device)  # [max_rows]: graph inputs
        self.positions = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, span: int) -> torch.Tensor:
        """tokens/positions [B] -> logits [B, V] (a graph-owned buffer, valid until the next call)."""
        B = tokens.shape[0]
        # Inputs that already are the buffers (see `adopt`) need no copy: two launches per step saved.
        if tokens.data_ptr() != self.tokens.data_ptr():
            self.tokens[:B].copy_(tokens)
        if positions.data_ptr() != self.positions.data_ptr():
            self.positions[:B].copy_(positions)
        key = (B, span)
        if key not in self.graphs:
            self.graphs[key] = self._capture(B, span)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits

    def adopt(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy tokens/positions [B] into the input buffers once and return the buffers' [B] views:
        updates made in place on them are what the next replay reads."""
        B = tokens.shape[0]
        if positions.shape != (B,) or B > self.tokens.shape[0]:
            raise ValueError(f"DecodeGraphs.adopt: tokens {tuple(tokens.shape)} and positions "
                             f"{tuple(positions.shape)} must be [B] with B <= {self.tokens.shape[0]}")
        self.tokens[:B].copy_(tokens)
        self.positions[:B].copy_(positions)
        return self.tokens[:B], self.positions[:B]

    def _capture(self, B: int, span: int):
        tokens, positions = self.tokens[:B], self.positions[:B]
        # Warm-up off the capture stream (cuBLAS workspaces, lazy initialisation). It computes the
        # very step about to be replayed, so its KV writes are the ones the replay makes.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step(tokens, positions, span)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.step(tokens, positions, span)
        self.pool = graph.pool()
        return graph, logits

    def __len__(self) -> int:
        return len(self.graphs)
