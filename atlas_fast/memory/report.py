"""Peak device memory per phase of a GRPO step, logged as `memory/<phase>_peak_gib`.

One number per phase (generation, reference, update, optimizer) says which phase sets the step's
peak and so which memory option to turn on: activation checkpointing and offload for `update`,
frozen-model offload for `reference`, optimizer offload for `optimizer`. Peaks come from the
caching allocator's own statistics (reset at the start of each phase, read at its end): host-side
counters, no device sync. On the CPU nothing is reported: the process RSS has no per-phase peak.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

PHASES = ("generation", "reference", "update", "optimizer")


class MemoryReport:
    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.enabled = self.device.type == "cuda"
        self._peaks: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record the peak allocated bytes inside the block; a phase entered again keeps its max."""
        if not self.enabled:
            yield
            return
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            peak = torch.cuda.max_memory_allocated(self.device)
            self._peaks[name] = max(self._peaks.get(name, 0), peak)

    def metrics(self) -> dict[str, float]:
        """The peaks since the last call, in GiB, and start over."""
        out = {f"memory/{k}_peak_gib": v / 2**30 for k, v in self._peaks.items()}
        self._peaks.clear()
        return out
