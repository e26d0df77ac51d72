"""AdamW whose moments live in pinned CPU memory and pass through the GPU for the step.

The default optimizer holds 3x the model's bytes on the GPU besides the weights (gradients and two
moments in the weights' dtype): 8.6 GiB for a 1.5B bf16 model, half of a GRPO update's peak.
`OffloadedAdamW` moves the moments off the GPU too, but steps on the CPU, which reads ~28 bytes
per parameter at host memory speed: about a second for 1.5B parameters. Here the moments stay in
the weights' dtype in host memory and the step is the default's own kernel (`_fused_adamw_`) on the
GPU, so the numbers are the default optimizer's, bit for bit. Per chunk of moments (`chunk_bytes`):
  1. a side stream uploads the chunk's moments into one of two device slots;
  2. the compute stream steps the chunk's weights in place from their gradients;
  3. a second side stream downloads the new moments back to host memory.
Uploads and downloads run on PCIe's two directions at once while the GPU steps the previous chunk:
4 bytes each way per bf16 parameter, ~0.12 s for 1.5B parameters at ~55 GB/s, against ~1 s for
the CPU step. A parameter larger than a chunk is stepped in flat slices (AdamW is elementwise).
Without CUDA the step runs on the host tensors directly, the same kernel on the CPU.
"""
from __future__ import annotations

from typing import Iterable

import torch

# Bytes of moments per chunk. Two device slots of this size are the optimizer's whole GPU
# footprint; 64 MiB moves in ~1.2 ms each way, long enough to hide a step launch (~50 us).
STREAM_CHUNK_BYTES = 64 * 2**20
_ALIGN = 256  # bytes: slot views start where any dtype's kernels can use vector loads
_MOMENTS = ("exp_avg", "exp_avg_sq")


class StreamedAdamW(torch.optim.AdamW):
    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 *, chunk_bytes: int = STREAM_CHUNK_BYTES) -> None:
        groups = list(params)
        if not groups or not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
        params = [p for g in groups for p in g["params"]]
        if not params:
            raise ValueError("StreamedAdamW got no parameters that require grad")
        if len({p.device for p in params}) != 1:
            raise ValueError("StreamedAdamW needs all parameters on one device")
        if params[0].device.type not in ("cpu", "cuda"):
            raise ValueError(f"StreamedAdamW runs on CUDA or the CPU, not on {params[0].device.type}")
        if chunk_bytes < 2 * _ALIGN:
            raise ValueError(f"StreamedAdamW: chunk_bytes must be >= {2 * _ALIGN}, got {chunk_bytes}")
        # fused=True: the groups say which kernel steps them, so a plain AdamW that loads this
        # optimizer's checkpoint goes on with the same kernel (and the same numbers).
        super().__init__([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps,
                         weight_decay=weight_decay, fused=True)
        # fused=True told GradScaler that this step skips overflowed gradients itself (it would
        # hand over found_inf and step anyway); it does not, so the scaler skips the call instead.
        self._step_supports_amp_scaling = False
        self.device = params[0].device
        self.chunk_bytes = chunk_bytes
        self._half = chunk_bytes // 2 // _ALIGN * _ALIGN  # bytes per moment in a slot, aligned
        on_cuda = self.device.type == "cuda"
        self._streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)) if on_cuda else None
        # Two slots of moments: exp_avg in a slot's first half, exp_avg_sq in its second.
        self._slots = [torch.empty(2 * self._half, dtype=torch.uint8, device=self.device) for _ in range(2)] if on_cuda else None
        self._freed = [None, None]  # per slot: event after the last download that read it
        self._written = None  # event: the last step's downloads are in host memory
        # Host moments: one zeroed pinned buffer per dtype and moment, each parameter a slice of it
        # (one pinned allocation per parameter would be rounded up by the host caching allocator).
        self._arena, self._home = {}, {}
        for p in params:
            offset = self._arena.get(p.dtype, 0)
            self._home[p] = (p.dtype, offset)
            self._arena[p.dtype] = offset + _aligned(p.numel() * p.element_size()) // p.element_size()
        self._arena = {dtype: tuple(torch.zeros(n, dtype=dtype, pin_memory=on_cuda) for _ in range(2))
                       for dtype, n in self._arena.items()}

    # ------------------------------------------------------------------ state
    def _moments(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p's two host moment tensors, zeroed until its first step: slices of the arena, or their
        own pinned tensors for parameters added later (add_param_group)."""
        if p in self._home:
            dtype, offset = self._home[p]
            return tuple(buf[offset:offset + p.numel()].view(p.shape) for buf in self._arena[dtype])
        pin = self.device.type == "cuda"
        return tuple(torch.zeros(p.shape, dtype=p.dtype, pin_memory=pin) for _ in range(2))

    def _state_of(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"], state["exp_avg_sq"] = self._moments(p)
        return state

    def synchronize(self) -> None:
        """Wait until the last step's moments are back in host memory (state_dict does this too);
        on CUDA the step returns while the downloads are still in flight."""
        if self._written is not None:
            self._written.synchronize()
            self._written = None


    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("StreamedAdamW does not take a closure")
        for group in self.param_groups:
            if group["amsgrad"]:
                raise ValueError("StreamedAdamW does not implement amsgrad")
            # One dtype per kernel call: grouped by dtype, each group in parameter order.
            live = sorted((p for p in group["params"] if p.grad is not None), key=lambda p: str(p.dtype))
            if not live:
                continue
            if any(p.grad.is_sparse for p in live):
                raise ValueError("StreamedAdamW does not take sparse gradients")
            states = [self._state_of(p) for p in live]
            torch._foreach_add_([s["step"] for s in states], 1.0)  # once per parameter, before its slices
            lr = group["lr"]
            hyper = dict(lr=lr.item() if torch.is_tensor(lr) else lr, beta1=group["betas"][0], beta2=group["betas"][1],
                         weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                         maximize=group["maximize"])
            pieces = _pieces(live, states, self._half)
            if self._streams is None:
                for chunk in pieces:
                    _adamw(chunk, [m for _, _, m, _, _ in chunk], [v for _, _, _, v, _ in chunk], hyper)
            else:
                self._stream_group(pieces, hyper)
        return None

    def _stream_group(self, pieces: list[list[tuple]], hyper: dict) -> None:
        compute = torch.cuda.current_stream(self.device)
        up, down = self._streams
        if self._written is not None:
            up.wait_event(self._written)  # the host moments the last step downloaded are complete
        up.wait_stream(compute)  # gradients (clipped) and weights are final
        for i, chunk in enumerate(pieces):
            slot = i % 2
            with torch.cuda.stream(up):
                if self._freed[slot] is not None:
                    up.wait_event(self._freed[slot])
                ms, vs = _views(self._slots[slot], chunk, self._half)
                for (_, _, m_host, v_host, _), m, v in zip(chunk, ms, vs):
                    m.copy_(m_host, non_blocking=True)
                    v.copy_(v_host, non_blocking=True)
                loaded = torch.cuda.Event()
                loaded.record(up)
            compute.wait_event(loaded)
            _adamw(chunk, ms, vs, hyper)
            stepped = torch.cuda.Event()
            stepped.record(compute)
            with torch.cuda.stream(down):
                down.wait_event(stepped)
                for (_, _, m_host, v_host, _), m, v in zip(chunk, ms, vs):
                    m_host.copy_(m, non_blocking=True)
                    v_host.copy_(v, non_blocking=True)
                freed = torch.cuda.Event()
                freed.record(down)
            self._freed[slot] = freed
        self._written = torch.cuda.Event()
        self._written.record(down)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        self.synchronize()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.synchronize()
        # The moments go straight into host memory: torch's loader would first cast each to its
        # parameter's device, putting all of them on the GPU at once.
        saved = state_dict["state"]
        moments = {i: {k: v for k, v in s.items() if k in _MOMENTS} for i, s in saved.items()}
        rest = {i: {k: v for k, v in s.items() if k not in _MOMENTS} for i, s in saved.items()}
        super().load_state_dict({**state_dict, "state": rest})
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            if i not in saved:
                continue
            state = self.state[p]
            for key, host in zip(_MOMENTS, self._moments(p)):
                if key in moments[i]:
                    host.copy_(moments[i][key].reshape(p.shape))
                    state[key] = host
            if "step" in state:
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device).clone()
        for group in self.param_groups:  # a plain foreach checkpoint's flags: this optimizer runs fused
            group["fused"], group["foreach"] = True, None


def _pieces(params, states, limit: int) -> list[list[tuple]]:
    """Chunks of (param, grad, exp_avg, exp_avg_sq, step) flat slices whose moments take at most
    `limit` bytes each (per moment), in parameter order, one dtype per chunk; a large parameter
    spans several chunks."""
    chunks, current, used = [], [], 0
    for p, s in zip(params, states):
        if current and current[-1][0].dtype != p.dtype:
            chunks.append(current)
            current, used = [], 0
        flat = [t.reshape(-1) for t in (p, p.grad, s["exp_avg"], s["exp_avg_sq"])]
        if not all(t.is_contiguous() for t in (p, p.grad)):
            raise ValueError("StreamedAdamW needs contiguous parameters and gradients")
        step_size = max(_ALIGN // p.element_size(), (limit // p.element_size()) // _ALIGN * _ALIGN)
        for start in range(0, p.numel(), step_size):
            n = min(step_size, p.numel() - start)
            size = _aligned(n * p.element_size())
            if current and used + size > limit:
                chunks.append(current)
                current, used = [], 0
            current.append((*(t[start:start + n] for t in flat), s["step"]))
            used += size
    if current:
        chunks.append(current)
    return chunks


def _views(slot: torch.Tensor, chunk: list[tuple], half: int) -> tuple[list, list]:
    """Device views for a chunk's two moments: exp_avg in the slot's first half, exp_avg_sq in its second."""
    ms, vs, offset = [], [], 0
    for p, _, _, _, _ in chunk:
        nbytes = p.numel() * p.element_size()
        ms.append(slot[offset:offset + nbytes].view(p.dtype))
        vs.append(slot[half + offset:half + offset + nbytes].view(p.dtype))
        offset += _aligned(nbytes)
    return ms, vs


def _adamw(chunk: list[tuple], ms: list, vs: list, hyper: dict) -> None:
    torch._fused_adamw_([c[0] for c in chunk], [c[1] for c in chunk], ms, vs, [], [c[4] for c in chunk], **hyper)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN
