"""Programmatic dependent launch (Hopper and later) for the decode step's Triton kernels.

A decode step at batch 64 is ~200 kernels of 2-10 us, and each waits for the one before it to
finish and drain before its own blocks are even scheduled. With PDL a kernel is launched while its
predecessor still runs: its blocks get onto the SMs, call `gdc_wait` (which returns once the
predecessor has completed and its writes are visible) and only then touch memory. Every kernel
here waits before its first load of anything a predecessor in the step may write, so the data flow
is exactly the serial one; what overlaps is launch, scheduling and (PREFETCH) the L2 prefetch of
bytes no kernel of the step writes: the projections' weights and the keys/values of earlier steps.
Positions are read before the wait too: the sampler writes them before the step's first kernel. Each kernel also calls `gdc_launch_dependents` on entry so its
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
# Before waiting, a kernel asks L2 for the bytes that do not depend on its predecessor (its slice of
# the weights, the attention's old keys and values), so they stream in while the predecessor runs.
PREFETCH = True


def options(device: torch.device, prefetch: bool = False) -> dict:
    """Launch keywords for a kernel taking `PDL: tl.constexpr` (and, with `prefetch`, a
    `PREFETCH: tl.constexpr` for its `prefetch_rows` calls)."""
    on = ENABLED and _supported(device)
    opts = {"PDL": True, "launch_pdl": True} if on else {"PDL": False}
    if prefetch:
        opts["PREFETCH"] = on and PREFETCH
    return opts


@functools.lru_cache(maxsize=None)
def _supported(device: torch.device) -> bool:
    return (gdc_wait is not None and device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(device)[0] >= 9)


@triton.jit
def prologue(PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def launch(PDL: tl.constexpr):
    """The first half of `prologue`: let the successor be scheduled."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def wait(PDL: tl.constexpr):
    """The second half of `prologue`: block until the predecessor's writes are visible."""
    if PDL:
        gdc_wait()


@triton.jit
def prefetch_rows(ptr, rows, row_stride, lo, hi, LINES: tl.constexpr, PREFETCH: tl.constexpr):
    """Ask L2 for columns lo..hi-1 of `rows` (an int tensor) of a row-major matrix at `ptr`: one
    prefetch per 128-byte line, LINES lines per row at most. Meant between `launch` and `wait`,
    where it overlaps the predecessor; PREFETCH is only set with PDL on a GPU, so the interpreter
    never sees the asm."""
    if PREFETCH:
        per_line: tl.constexpr = 1024 // ptr.dtype.element_ty.primitive_bitwidth
        cols = lo + tl.arange(0, LINES) * per_line
        ptrs = ptr + rows[:, None] * row_stride + cols[None, :]
        ok = (cols < hi)[None, :] & (rows >= 0)[:, None]
        tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                                  "=r,l,r", [ptrs, ok.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
