"""Frozen models that live in CPU memory and visit the GPU for their forward.

The reference model, reward models (and later a student) run one forward per generation batch
and never train, yet a resident 1.5B model holds 2.9 GiB of bf16 weights (7B: 15 GiB) through the
whole update. Here their weights live in pinned host memory; a forward brings them in either
- layer by layer: layer i+1's weights are copied on a side stream while layer i computes, so the
  device holds about two layers plus the embeddings and head. The copy hides when a layer's
  compute outlasts it: a 0.5B-shape layer is 29.8 MB, ~0.6 ms over PCIe 5 (~50 GB/s pinned),
  and its forward over 8 x 1.3k tokens is 0.24 TFLOP, ~0.6 ms; longer rows hide it, shorter
  ones wait on the copy. Or
- wholesale: the whole model for the length of a `visit()` block, one upload for every forward in
  it (the reference pass over all micro-batches), when it fits in free device memory.
`mode="auto"` streams layer by layer when the visit is known to hold one forward (the copy then
overlaps the compute instead of preceding it: on an H200 the 1.5B reference pass over 8 x 1.3k
tokens took 0.096 s streamed against 0.134 s wholesale, at the same peak), and otherwise goes
wholesale when the model's bytes fit in half the free device memory at the start of the visit
(one upload for all its forwards), layer-wise when they do not.

Weights are swapped through `tensor.data`, so the module tree, parameter identities, tied weights
and in-place updates of the home copy (the reference model's EMA sync) are all preserved.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from .checkpointing import decoder_layers

MODES = ("auto", "layer", "model")
# auto: wholesale only if the model takes at most this share of the free device memory, leaving
# the rest for the visiting forward's activations and logits.
WHOLESALE_SHARE = 0.5

_ATTR = "_atlas_frozen_offload"


def frozen_offload(model: torch.nn.Module) -> "FrozenOffload | None":
    return getattr(model, _ATTR, None)


class FrozenOffload:
    """Keeps `model`'s weights in (pinned) CPU memory; every forward runs on `device`.

    Installed with forward hooks on the model and its decoder layers, so callers need no change:
    inputs on the CPU are moved to `device`, outputs stay there. Without CUDA the "device" copy is
    a fresh CPU tensor, which keeps the bookkeeping testable on any machine.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device | str, mode: str = "auto") -> None:
        if mode not in MODES:
            raise ValueError(f"offload mode must be one of {MODES}, got {mode!r}")
        self.model = model
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"cannot offload a model to run on {self.device}: CUDA is not available")
        try:
            layers = list(decoder_layers(model))
        except ValueError:
            if mode == "layer":
                raise
            layers = []  # no layer list: the model can only move wholesale
        self.mode = mode if layers else "model"
        model.requires_grad_(False).eval()
        pin = self.device.type == "cuda"
        # Groups of tensors that move together: one per decoder layer, then everything else.
        seen: set[int] = set()
        self._groups: list[list[torch.Tensor]] = []
        for module in layers + [model]:
            group = []
            for t in list(module.parameters()) + list(module.buffers()):
                if id(t) not in seen:
                    seen.add(id(t))
                    group.append(t)
            self._groups.append(group)
        self._homes: list[list[torch.Tensor]] = []
        for group in self._groups:
            homes = []
            for t in group:
                home = t.data.to("cpu")
                t.data = home.pin_memory() if pin else home
                homes.append(t.data)
            self._homes.append(homes)
        self.nbytes = sum(t.numel() * t.element_size() for g in self._groups for t in g)
        self.stream = torch.cuda.Stream(self.device) if pin else None
        self._inflight: dict[int, tuple[list[torch.Tensor], Any]] = {}
        self._present: set[int] = set()
        self._visit: str | None = None  # inside visit(): "wholesale" or "layers" (non-layer weights resident)
        self._rest = len(self._groups) - 1
        self._handles = [model.register_forward_pre_hook(self._model_pre, with_kwargs=True),
                         model.register_forward_hook(self._model_post)]
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: self._layer_pre(i)))
            self._handles.append(layer.register_forward_hook(lambda m, a, o, i=i: self._layer_post(i)))
        setattr(model, _ATTR, self)

    # ------------------------------------------------------------------ public
    @contextlib.contextmanager
    def visit(self, forwards: int | None = None) -> Iterator[torch.nn.Module]:
        """A block of forwards (`forwards`: how many, when the caller knows): the whole model
        resident for the block when the mode allows it; otherwise the non-layer weights
        (embeddings, final norm, head) stay resident and the layers stream. Either way the body and
        the head can also be called on their own inside the block (the fused linear head calls the
        decoder body, then reads the head's weight itself)."""
        if self._visit is not None:
            yield self.model
            return
        self._visit = "wholesale" if self._wholesale_fits(forwards) else "layers"
        groups = range(len(self._groups)) if self._visit == "wholesale" else [self._rest]
        for g in groups:
            self._enter(g)
        try:
            yield self.model
        finally:
            for g in list(self._present):
                self._leave(g)
            self._inflight.clear()
            self._visit = None

    def on_device_tensors(self) -> int:
        """How many of the model's tensors are on the device right now (0 between forwards)."""
        return sum(t.device == self.device and t.data_ptr() != h.data_ptr()
                   for group, homes in zip(self._groups, self._homes) for t, h in zip(group, homes))

    def remove(self) -> None:
        """Drop the hooks; the weights stay in CPU memory."""
        for h in self._handles:
            h.remove()
        setattr(self.model, _ATTR, None)

    # ------------------------------------------------------------------ decisions
    def _wholesale_fits(self, forwards: int | None = None) -> bool:
        if self.mode == "layer" or (self.mode == "auto" and forwards == 1):
            return False
        if self.mode == "model" or self.device.type != "cuda":
            return True
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.nbytes <= WHOLESALE_SHARE * free

    # ------------------------------------------------------------------ hooks
    def _model_pre(self, module, args, kwargs):
        args, kwargs = _to_device((args, kwargs), self.device)
        if self._visit is None and self.mode == "model":
            for g in range(len(self._groups)):
                self._enter(g)
        elif self._visit != "wholesale":
            self._enter(self._rest)  # embeddings, final norm, head: needed first and last
            self._fetch(0)
        return args, kwargs

    def _model_post(self, module, args, output):
        if self._visit is None:
            for g in list(self._present):
                self._leave(g)
            self._inflight.clear()
        return output

    def _streams_layers(self) -> bool:
        return self._visit == "layers" or (self._visit is None and self.mode != "model")

    def _layer_pre(self, i: int) -> None:
        if not self._streams_layers():
            return
        self._enter(i)
        if i + 1 < self._rest:
            self._fetch(i + 1)  # overlaps with layer i's compute

    def _layer_post(self, i: int) -> None:
        if self._streams_layers():
            self._leave(i)

    # ------------------------------------------------------------------ transfers
    def _fetch(self, g: int) -> None:
        if g in self._inflight or g in self._present:
            return
        homes = self._homes[g]
        if self.stream is None:
            self._inflight[g] = ([h.clone() for h in homes], None)
            return
        with torch.cuda.stream(self.stream):
            copies = [h.to(self.device, non_blocking=True) for h in homes]
            ready = torch.cuda.Event()
            ready.record(self.stream)
        self._inflight[g] = (copies, ready)

    def _enter(self, g: int) -> None:
        if g in self._present:
            return
        self._fetch(g)
        copies, ready = self._inflight.pop(g)
        if ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            for c in copies:
                c.record_stream(current)  # allocated on the side stream, read on the compute stream
        for t, c in zip(self._groups[g], copies):
            t.data = c
        self._present.add(g)

    def _leave(self, g: int) -> None:
        for t, home in zip(self._groups[g], self._homes[g]):
            t.data = home  # frozen: the device copy holds nothing new, so it is dropped, not copied back
        self._present.discard(g)


def offload_frozen(model: Any, device: torch.device | str, mode: str = "auto") -> FrozenOffload:
    """Put a frozen model (or an object holding one in `.model`, as `RewardModel` does) in CPU memory."""
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "model", None)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"cannot offload {type(model).__name__}: it is not a torch.nn.Module and has no .model")
    existing = frozen_offload(module)
    return existing if existing is not None else FrozenOffload(module, device, mode)


def place_frozen(obj: Any, device: torch.device | str, *, offload: bool, mode: str = "auto") -> Any:
    """Where a frozen model (or an object holding one in `.model`) lives: on `device`, or with
    `offload` in CPU memory, visiting `device` for its forwards. Objects that only have `.to()`
    (a reward function with state of its own) are moved to the CPU when offloaded, as before."""
    module = obj if isinstance(obj, torch.nn.Module) else getattr(obj, "model", None)
    if offload and isinstance(module, torch.nn.Module):
        offload_frozen(module, device, mode)
    elif hasattr(obj, "to"):
        obj.to("cpu" if offload else device)
    return obj


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True) if obj.device != device else obj
    if isinstance(obj, tuple):
        return tuple(_to_device(x, device) for x in obj)
    if isinstance(obj, list):
        return [_to_device(x, device) for x in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj
