"""Programmatic dependent launch (Hopper and later) for the decode step's Triton kernels.

A decode step at batch 64 is ~200 kernels of 2-10 us, and each waits for the one before it to
finish and drain before its own blocks are even scheduled. With PDL a kernel is launched while its
predecessor still runs: its blocks get onto the SMs, call `gdc_wait` (which returns once the
predecessor has completed and its writes are visible) and only then touch memory. Every kernel
here waits before its first load or store, so the data flow is exactly the serial one; what
overlaps is launch and scheduling. Each kernel also calls `gdc_launch_dependents` on entry so its
successor can be scheduled that early. Completion is transitive (a kernel completes only after its
own wait returned), so a kernel may read what any earlier kernel wrote.

Tried and removed: an L2 prefetch (prefetch.global.L2) of each projection's weight slice and of
the attention's old keys/values between the launch and the wait made the H200 decode step slower
(Qwen2.5-0.5B: 1.004 against 0.966 ms at 512 new tokens, 1.107 against 1.037 at 1024; 1.5B: 2.098
against 1.936), like the side-stream prefetch before it.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: PDL stays off
    gdc_launch_dependents = gdc_wait = None

ENABLED = True  # False: plain launches (benchmark A/B)


def options(device: torch.device) -> dict:
    """Launch keywords for a kernel taking a `PDL: tl.constexpr` argument."""
    return {"PDL": True, "launch_pdl": True} if ENABLED and _supported(device) else {"PDL": False}


@functools.lru_cache(maxsize=None)
def _supported(device: torch.device) -> bool:
    return (gdc_wait is not None and device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(device)[0] >= 9)


@triton.jit
def prologue(PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
