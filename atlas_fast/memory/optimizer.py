"""AdamW with its fp32 master weights and moments in CPU memory: the device keeps bf16 weights only.

AdamW over fp32 weights holds 16 bytes per parameter on the GPU (weights, gradients, two
moments): 23 GiB for a 1.5B model, more than its checkpointed activations at 8 x 8k tokens. Here
the fp32 master weights and moments live in host memory, the GPU keeps bf16 weights and gradients
(4 bytes per parameter), and the step runs on the CPU (torch's fused CPU AdamW):
  1. the gradients are copied to pinned host buffers on a side stream, all issued at once;
  2. chunk by chunk (CHUNK_BYTES of gradients), the CPU waits for that chunk's copy, steps it, and
     queues the new weights' upload on the side stream, so the three transfers and the CPU step
     overlap each other; the compute stream waits for the uploads only where it next reads weights.
`OffloadedAdamW` is a `torch.optim.AdamW` over the master weights: schedulers, `param_groups`,
`state_dict` (with the master weights added, since a bf16 model cannot restore them) all work.
Without CUDA the same code runs with plain CPU tensors and no streams.
"""
from __future__ import annotations

from typing import Iterable

import torch

# Chunk of gradient bytes per pipelined step: large enough that one fused CPU AdamW call
# amortises its dispatch (~50 us), small enough that the first upload starts early: 64 MiB of
# bf16 is 32M parameters, whose step streams ~28 bytes each (~0.9 GB, ~50 ms at 20 GB/s).
CHUNK_BYTES = 64 * 2**20


class OffloadedAdamW(torch.optim.AdamW):
    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 *, weight_dtype: torch.dtype | None = None, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.model_params = [p for p in params if p.requires_grad]
        if not self.model_params:
            raise ValueError("OffloadedAdamW got no parameters that require grad")
        if len({p.device for p in self.model_params}) != 1:
            raise ValueError("OffloadedAdamW needs all parameters on one device")
        self.device = self.model_params[0].device
        # The master copy is taken before any cast, so a model loaded in fp32 loses nothing.
        masters = [p.detach().to("cpu", torch.float32, copy=True) for p in self.model_params]
        try:
            super().__init__(masters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        except (RuntimeError, ValueError):  # a torch without the fused CPU kernel
            super().__init__(masters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=True)
        self.masters = masters
        if weight_dtype is not None:
            for p in self.model_params:
                p.data = p.data.to(weight_dtype)
        on_cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if on_cuda else None
        pin = dict(pin_memory=True) if on_cuda else {}
        # Host staging buffers: gradients come down in the model's dtype, weights go up in it.
        self._grads_host = [torch.empty(p.shape, dtype=p.dtype, **pin) for p in self.model_params] if on_cuda else None
        self._weights_host = [torch.empty(p.shape, dtype=p.dtype, **pin) for p in self.model_params] if on_cuda else None
        self._uploaded = None  # event: the last step's uploads are done (the staging buffers are free)
        self._chunks = _chunks([p.numel() * p.element_size() for p in self.model_params], chunk_bytes)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("OffloadedAdamW does not take a closure")
        params, masters = self.model_params, self.masters
        if self.stream is None:
            for chunk in self._chunks:
                self._step_chunk(chunk, [params[i].grad for i in chunk])
                for i in chunk:
                    params[i].data.copy_(masters[i])
            return None
        if self._uploaded is not None:
            self._uploaded.synchronize()  # the staging buffers of the last step are free again
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)  # gradients are final (backward, clipping) before they are read
        landed = []
        with torch.cuda.stream(self.stream):
            for chunk in self._chunks:
                for i in chunk:
                    if params[i].grad is not None:
                        self._grads_host[i].copy_(params[i].grad, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
                landed.append(event)
        for chunk, event in zip(self._chunks, landed):
            event.synchronize()
            self._step_chunk(chunk, [self._grads_host[i] if params[i].grad is not None else None for i in chunk])
            for i in chunk:
                self._weights_host[i].copy_(masters[i])  # fp32 -> model dtype on the CPU
            with torch.cuda.stream(self.stream):
                for i in chunk:
                    params[i].data.copy_(self._weights_host[i], non_blocking=True)
        self._uploaded = torch.cuda.Event()
        self._uploaded.record(self.stream)
        compute.wait_stream(self.stream)  # the next forward reads the new weights
        return None

    def _step_chunk(self, chunk: list[int], grads: list[torch.Tensor | None]) -> None:
        for i, g in zip(chunk, grads):
            self.masters[i].grad = None if g is None else g.to(torch.float32)
        super().step()  # steps exactly the masters that have a gradient: this chunk's
        for i in chunk:
            self.masters[i].grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        super().zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["master_weights"] = [m.clone() for m in self.masters]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        master_weights = state_dict.pop("master_weights", None)
        super().load_state_dict(state_dict)
        if master_weights is None:  # a checkpoint of a plain optimizer: the model's weights are the masters
            master_weights = [p.detach().float() for p in self.model_params]
        if len(master_weights) != len(self.masters):
            raise ValueError(f"optimizer checkpoint holds {len(master_weights)} master weights for "
                             f"{len(self.masters)} trainable parameters")
        with torch.no_grad():
            for m, saved, p in zip(self.masters, master_weights, self.model_params):
                if saved.shape != m.shape:
                    raise ValueError(f"optimizer checkpoint master weight of shape {tuple(saved.shape)} does not "
                                     f"match the parameter's {tuple(m.shape)}")
                m.copy_(saved)
                p.data.copy_(m)


def _chunks(sizes: list[int], limit: int) -> list[list[int]]:
    chunks, current, total = [], [], 0
    for i, size in enumerate(sizes):
        if current and total + size > limit:
            chunks.append(current)
            current, total = [], 0
        current.append(i)
        total += size
    if current:
        chunks.append(current)
    return chunks
