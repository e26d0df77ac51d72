"""Memory placement: activation checkpointing and keeping frozen models off the GPU.

Frozen models (the reference, reward models, later the student) are only needed for one
forward per generation batch. With `offload_untrained_models` they live on the CPU and visit
the GPU for that forward: a host round trip per generation, in exchange for a full model's
worth of GPU memory during the update, which is where activations need it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    # Non-reentrant checkpointing works with frozen inputs (PEFT) and with autocast; the
    # reentrant variant silently drops gradients when no input requires grad.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = False  # a KV cache is pointless when activations are recomputed
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def module_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def on_device(model: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
    """Run a block with `model` on `device`, then put it back where it was."""
    home = module_device(model)
    if home == device:
        yield model
        return
    model.to(device, non_blocking=True)
    try:
        yield model
    finally:
        model.to(home)
