"""Peak device memory and time per phase of a GRPO step: `memory/<phase>_peak_gib`, `time/<phase>_s`.

One number per phase (generation, reference, update, optimizer) says which phase sets the step's
peak and so which memory option to turn on: activation checkpointing and offload for `update`,
frozen-model offload for `reference`, optimizer offload for `optimizer`; the times say what each
option costs. Peaks come from the caching allocator's own statistics (reset at the start of each
phase, read at its end): host-side counters, no device sync. Times come from CUDA events recorded
around each phase and read when the step's metrics are collected, after the step's own host syncs:
the phases run unsynchronised. On the CPU, where work is synchronous, the times are wall-clock
intervals and no peaks are reported (the process RSS has no per-phase peak).
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch

PHASES = ("generation", "reference", "update", "optimizer")


class PhaseReport:
    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        self._peaks: dict[str, int] = {}
        self._spans: dict[str, list] = {}  # phase -> [(start, end)] events (CUDA) or seconds (CPU)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record the peak allocated bytes and the time inside the block; a phase entered again
        keeps its largest peak and adds up its time."""
        if not self.on_cuda:
            start = time.perf_counter()
            try:
                yield
            finally:
                self._spans.setdefault(name, []).append(time.perf_counter() - start)
            return
        torch.cuda.reset_peak_memory_stats(self.device)
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._spans.setdefault(name, []).append((start, end))
            peak = torch.cuda.max_memory_allocated(self.device)
            self._peaks[name] = max(self._peaks.get(name, 0), peak)

    def metrics(self) -> dict[str, float]:
        """The peaks (GiB) and times (s) since the last call, and start over."""
        out = {f"memory/{k}_peak_gib": v / 2**30 for k, v in self._peaks.items()}
        for name, spans in self._spans.items():
            if self.on_cuda:
                for _, end in spans:
                    end.synchronize()
                out[f"time/{name}_s"] = sum(start.elapsed_time(end) for start, end in spans) / 1e3
            else:
                out[f"time/{name}_s"] = sum(spans)
        self._peaks.clear()
        self._spans.clear()
        return out
