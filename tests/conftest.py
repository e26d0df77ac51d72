"""Test session setup, run before any test module (and so before any Triton kernel) is imported.

Where the kernels run is decided here, once: @triton.jit reads TRITON_INTERPRET when a kernel is
defined, so the switch must be set before atlas_kernels is imported and cannot change later.
Without a CUDA device the Triton kernels run on the CPU through the interpreter (how CI checks
them). With one they compile, so `python -m pytest tests/kernels/test_cuda.py` on a GPU machine
runs the CUDA tests with no variable to set; the interpreter-only CPU kernel tests then skip
(`TRITON_INTERPRET=1 python -m pytest tests` runs those there). An explicit TRITON_INTERPRET
always wins.
"""
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def interpreter_setting(environ, cuda_available: bool) -> str | None:
    """TRITON_INTERPRET for this session: the caller's value, else "1" without CUDA, else unset."""
    if "TRITON_INTERPRET" in environ:
        return environ["TRITON_INTERPRET"]
    return None if cuda_available else "1"


# torch.cuda.is_available() asks the driver for a device count; it imports no Triton module.
_setting = interpreter_setting(os.environ, torch.cuda.is_available())
if _setting is not None:
    os.environ["TRITON_INTERPRET"] = _setting

torch.set_num_threads(2)
