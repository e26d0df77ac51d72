"""Memory placement: where activations, frozen models, optimizer state and pad tokens go.

- `checkpointing`: per-decoder-layer activation checkpointing, saved layer inputs optionally
  offloaded to pinned CPU memory between forward and backward;
- `offload`: frozen models (reference, reward models) kept in CPU memory, streamed to the GPU
  layer by layer or moved wholesale for a forward;
- `optimizer`: AdamW with fp32 master weights and moments on the CPU, stepped there;
- `streamed`: AdamW with its moments in CPU memory, streamed through the GPU for the step;
- `packing`: padding-free micro-batches (one packed row per micro-batch) and token balancing;
- `report`: peak device memory and time per phase of a step.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .checkpointing import (ActivationOffload, decoder_layers, disable_activation_checkpointing,
                            enable_activation_checkpointing)
from .offload import FrozenOffload, frozen_offload, offload_frozen, place_frozen
from .optimizer import OffloadedAdamW
from .streamed import StreamedAdamW
from .packing import (PackedBatch, balance_rows, pack, packed_completion_hidden, packed_completion_logits,
                      prepare_packing, split_micro_batches, supports_packing, token_chunks)
from .report import PhaseReport

__all__ = [
    "ActivationOffload", "FrozenOffload", "OffloadedAdamW", "PackedBatch", "PhaseReport", "balance_rows",
    "decoder_layers", "disable_activation_checkpointing", "enable_activation_checkpointing",
    "enable_gradient_checkpointing", "frozen_offload", "module_device", "offload_frozen", "on_device", "pack",
    "packed_completion_hidden", "packed_completion_logits", "place_frozen", "prepare_packing",
    "split_micro_batches", "StreamedAdamW", "supports_packing", "token_chunks",
]


def enable_gradient_checkpointing(model: torch.nn.Module, offload: bool = False,
                                  keep_attention: bool = False) -> ActivationOffload | None:
    """Checkpoint each decoder layer (non-reentrant); `offload` keeps the saved inputs in CPU memory,
    `keep_attention` each layer's attention output (the recompute then skips attention)."""
    return enable_activation_checkpointing(model, offload=offload, keep_attention=keep_attention)


def module_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one: torch.device("cuda") names the current GPU, which parameters
    spell "cuda:0" (a plain == calls them different, and a model "moved" between them walks every
    module for nothing)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cpu" or a.index == b.index:
        return True
    if a.type != "cuda" or (a.index is not None and b.index is not None):
        return False
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


@contextlib.contextmanager
def on_device(model: torch.nn.Module, device: torch.device, forwards: int | None = None) -> Iterator[torch.nn.Module]:
    """Run a block of forwards of `model` on `device`, then leave it where it was.

    An offloaded frozen model (`offload_frozen`) already runs every forward on its device; the
    block lets it stay resident for all of them when it fits (one upload, not one per forward).
    `forwards`, the block's number of forwards when known, lets its "auto" mode stream a single
    forward layer by layer instead (see FrozenOffload.visit).
    """
    offload = frozen_offload(model)
    if offload is not None:
        with offload.visit(forwards):
            yield model
        return
    home = module_device(model)
    if same_device(home, device):
        yield model
        return
    model.to(device, non_blocking=True)
    try:
        yield model
    finally:
        model.to(home)
