"""CUDA graphs of the decode step, one per (batch bucket, attention span), captured lazily.

A decode step of a 24-layer model is 250-900 small kernels; launched one by one from Python it takes
milliseconds of CPU time while the GPU needs about one. Replaying a captured graph launches them all
at once. Shapes must be static, so the batch is padded up to a bucket (finished rows leave by
compaction into a smaller bucket). With SDPA attention the span of the cache it reads is rounded up
to a step, one graph per span; the Triton attention reads each row's own length, so its step has
one span (the cache length) and one graph per bucket. All graphs share one memory pool: they never
run at the same time.

A `GraphPost` captures more work after the step into the same graph (the engine's sampler and its
bookkeeping), so a decode step is one graph launch and nothing else. It must read and write only
buffers that outlive the graph: the input buffers here (tokens, positions, finished flags, output
rows) and its owner's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable

import torch

StepFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (tokens [B], positions [B], span) -> logits [B, V]


@dataclass(frozen=True)
class GraphPost:
    """Work captured after the step: run(logits, tokens, positions, finished, rows, scratch). With
    scratch=True (the eager warm-up before capture) it must leave its owner's buffers untouched:
    the inputs it gets then are copies. `key` tells graphs with different baked-in arguments apart."""
    key: Hashable
    run: Callable[..., None]


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
        self.finished = torch.ones(max_rows, dtype=torch.bool, device=device)  # read and written by a GraphPost
        self.rows = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, span: int,
                 post: GraphPost | None = None) -> torch.Tensor:
        """tokens/positions [B] -> logits [B, V] (a graph-owned buffer, valid until the next call).
        With `post`, the graph also runs it on the buffers' [B] views (see `adopt`)."""
        B = tokens.shape[0]
        # Inputs that already are the buffers (see `adopt`) need no copy: two launches per step saved.
        if tokens.data_ptr() != self.tokens.data_ptr():
            self.tokens[:B].copy_(tokens)
        if positions.data_ptr() != self.positions.data_ptr():
            self.positions[:B].copy_(positions)
        key = (B, span, post.key if post is not None else None)
        if key not in self.graphs:
            self.graphs[key] = self._capture(B, span, post)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits

    def adopt(self, tokens: torch.Tensor, positions: torch.Tensor, finished: torch.Tensor,
              rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Copy tokens/positions/finished/rows [B] into the buffers once and return the buffers' [B]
        views: updates made in place on them are what the next replay reads."""
        B = tokens.shape[0]
        if any(x.shape != (B,) for x in (positions, finished, rows)) or B > self.tokens.shape[0]:
            raise ValueError(f"DecodeGraphs.adopt: tokens {tuple(tokens.shape)}, positions {tuple(positions.shape)}, "
                             f"finished {tuple(finished.shape)} and rows {tuple(rows.shape)} must be [B] with "
                             f"B <= {self.tokens.shape[0]}")
        views = []
        for buf, x in ((self.tokens, tokens), (self.positions, positions), (self.finished, finished),
                       (self.rows, rows)):
            buf[:B].copy_(x)
            views.append(buf[:B])
        return tuple(views)

    def _capture(self, B: int, span: int, post: GraphPost | None):
        views = (self.tokens[:B], self.positions[:B], self.finished[:B], self.rows[:B])
        # Warm-up off the capture stream (cuBLAS workspaces, lazy initialisation, Triton compiles).
        # It computes the very step about to be replayed, so its KV writes are the ones the replay
        # makes; the post runs on copies, so the replay starts from the same tokens and positions.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self.step(views[0], views[1], span)
            if post is not None:
                post.run(logits, *(v.clone() for v in views), scratch=True)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.step(views[0], views[1], span)
            if post is not None:
                post.run(logits, *views, scratch=False)
        self.pool = graph.pool()
        return graph, logits

    def __len__(self) -> int:
        return len(self.graphs)
