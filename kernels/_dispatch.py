"""Where an op runs: Triton for CUDA tensors (or anything under TRITON_INTERPRET=1), else PyTorch."""
from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # the CPU reference path needs nothing beyond torch
    HAS_TRITON = False

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def use_triton(*tensors: torch.Tensor) -> bool:
    if not HAS_TRITON:
        return False
    ts = [t for t in tensors if t is not None]
    # float64 exists for oracles and checks; the kernels keep fp32 accumulators and never see it.
    if any(t.dtype == torch.float64 for t in ts):
        return False
    if all(t.is_cuda for t in ts):
        return True
    # Read at call time, not import time, so the switch is explicit and testable.
    return os.environ.get("TRITON_INTERPRET") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
