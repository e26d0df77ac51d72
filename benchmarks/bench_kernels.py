#!/usr/bin/env python
"""Time atlas_kernels against its baselines on one CUDA GPU and record the numbers.

Cases (bf16 logits, N = B*T tokens, both vocabularies):
  * selective log-prob, forward (no grad) and forward+backward;
  * GRPO loss straight from the logits, forward+backward (beta=0.04, old and ref log-probs,
    random advantages, right-padded mask);
  * GRPO loss through a real Qwen2 LM head, as the trainer runs it: the head (hidden 896,
    V=151936, Qwen2.5-0.5B's width) turns hidden states [B, C+1, H] into logits [B, C+1, V], a
    non-leaf passed to the loss unsliced, and backward goes through the head into the hidden
    states and the weight; next to the old sliced path and Liger on the same unsliced logits;
  * GRPO loss on token log-probs [B, T] and group advantages, small O(B*T) tensors.

Launch-bound cases (whose byte floor is under LAUNCH_BOUND_MS) are timed REPEATS times over and
report min / median / max of those medians: a single figure there says more about the host's
launch latency at that moment than about the kernel, and did not reproduce run to run.

Rows: ours, the eager reference (`atlas_kernels.reference`), `torch.compile` of that reference,
TRL 1.16 and Liger-Kernel 0.8.5 where they implement the same function. A peer that is missing or
fails is reported as "n/a (reason)" / "error: ..." and the run goes on.

Each row gives the median time (CUDA events, warm-up first, L2 flushed before every call), the
bytes the operation must move divided by that time, that rate as a share of a device-to-device
copy measured in the same run, the floor (bytes / copy rate), the peak memory beyond the inputs,
and time relative to ours. Each row is also checked against ours and the eager reference
(log-probs / loss, and d(logits) or d(logp) for forward+backward): a fast wrong answer shows.

In-place backward (ours with inplace_backward=True, Liger's triton_grpo_loss) overwrites the
logits with d(logits), so every call gets a fresh copy of the logits first. That copy runs
outside the timed region; its cost is timed on its own and shown in the "+ restore" column.

    python benchmarks/bench_kernels.py [--quick] [--out benchmarks/RESULTS.md] [--no-compile]

The tables are printed and written into --out between the markers below, leaving the rest of
that file alone. `--cpu-smoke` runs tiny shapes on the CPU (set TRITON_INTERPRET=1 to push the
Triton kernels through the interpreter) to exercise this harness; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import hashlib
import importlib.metadata
import inspect
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_md sits beside this file, however it is loaded
import results_md  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "RESULTS.md"

API = ("selective_logprobs", "group_advantages", "grpo_loss", "grpo_loss_from_logits", "kl_k3")
TEMPERATURE = 1.0
# TRL names: beta, epsilon (low/high), loss_type. Ours and the reference take these keywords.
LOSS_OPTIONS = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo")
# Completion lengths are uniform in [(1 - MAX_PAD) * T, T]: about MAX_PAD / 2 of the tokens pad.
MAX_PAD = 0.25
# Noise between the policy's log-probs and old / ref: enough that some ratios leave [0.8, 1.2].
OLD_NOISE, REF_NOISE = 0.15, 0.1
L2_FLUSH_BYTES = 256 * 2**20  # larger than any current L2 (H100 50 MB, H200 60 MB)
COPY_BYTES = 2**30  # copy-bandwidth probe: 1 GiB source, 1 GiB destination
# Below this byte floor a case is launch-bound: two runs of the 0.0067 ms group_advantages or the
# 0.39 ms fused loss at V=32000 differed by up to 2x with the host's load. Those cases are timed
# REPEATS times and reported as a range.
LAUNCH_BOUND_MS = 0.5
REPEATS = 5


@dataclass(frozen=True)
class Shapes:
    batch: int  # B for the logits cases
    seq: int  # T for the logits cases
    vocabs: tuple[int, ...]
    tok_batch: int  # B for the token-level loss
    tok_seq: int  # T for the token-level loss
    adv_batch: int  # number of rewards
    group: int  # G
    head_hidden: int = 896  # the LM-head case: Qwen2.5-0.5B's hidden size ...
    head_vocab: int = 151936  # ... and vocabulary


FULL = Shapes(batch=8, seq=1024, vocabs=(151936, 32000), tok_batch=1024, tok_seq=4096, adv_batch=1024, group=8)
QUICK = Shapes(batch=2, seq=256, vocabs=(151936, 32000), tok_batch=64, tok_seq=512, adv_batch=1024, group=8)
CPU_SMOKE = Shapes(batch=2, seq=8, vocabs=(1000, 96), tok_batch=4, tok_seq=16, adv_batch=32, group=8,
                   head_hidden=64, head_vocab=1000)


# --------------------------------------------------------------------------------------------
# Implementations under test
# --------------------------------------------------------------------------------------------

class Unavailable(Exception):
    """A peer cannot run this case; the message becomes the row's "n/a (...)"."""


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) < 160 else text[:157] + "..."


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@dataclass
class Peers:
    """Every implementation, imported once; a missing one holds the reason instead."""

    ours: Any = None
    ours_reason: str = ""
    ref: Any = None
    ref_reason: str = ""
    trl_select: Callable | None = None
    trl_label: str = "TRL 1.16"
    trl_reason: str = ""
    liger_select: Callable | None = None
    liger_loss: Callable | None = None
    liger_reason: str = ""
    notes: list[str] = field(default_factory=list)

    def our(self, name: str) -> Callable:
        if self.ours is None:
            raise Unavailable(self.ours_reason)
        fn = getattr(self.ours, name, None)
        if fn is None:
            raise Unavailable(f"atlas_kernels has no {name} yet")
        return fn

    def reference(self, name: str) -> Callable:
        if self.ref is None:
            raise Unavailable(self.ref_reason)
        fn = getattr(self.ref, name, None)
        if fn is None:
            raise Unavailable(f"atlas_kernels.reference has no {name}")
        return fn

    def trl(self) -> Callable:
        if self.trl_select is None:
            raise Unavailable(self.trl_reason)
        return self.trl_select

    def liger(self, which: str) -> Callable:
        fn = self.liger_select if which == "select" else self.liger_loss
        if fn is None:
            raise Unavailable(self.liger_reason)
        return fn


def load_peers() -> Peers:
    p = Peers()
    try:
        import atlas_kernels

        p.ours = atlas_kernels
        missing = [n for n in API if not hasattr(atlas_kernels, n)]
        if missing:
            p.notes.append(f"atlas_kernels lacks {', '.join(missing)}")
    except Exception as exc:  # noqa: BLE001 - any import failure becomes an n/a row
        p.ours_reason = f"import atlas_kernels failed: {_short(exc)}"
    try:
        import atlas_kernels.reference as reference

        p.ref = reference
    except Exception as exc:  # noqa: BLE001
        p.ref_reason = f"import atlas_kernels.reference failed: {_short(exc)}"
    _load_trl(p)
    _load_liger(p)
    return p


def _load_trl(p: Peers) -> None:
    # The public entry point first. Its module imports pandas and datasets (and so pyarrow, ~55 MB
    # of wheels), which the GPU image lacks; then fall back to the function it dispatches to.
    try:
        from trl.trainer.utils import selective_log_softmax

        p.trl_select = selective_log_softmax
        p.trl_label = "TRL 1.16 selective_log_softmax"
        return
    except Exception as exc:  # noqa: BLE001
        first = _short(exc)
    try:
        from trl.kernels import selective_log_softmax_and_entropy
    except Exception as exc:  # noqa: BLE001
        p.trl_reason = f"trl.trainer.utils: {first}; trl.kernels: {_short(exc)}"
        return

    def trl_selective_log_softmax(logits, index, temperature=1.0):
        # trl.trainer.utils.selective_log_softmax sends CUDA fp16/bf16/fp32 logits with a unit
        # vocabulary stride and at most 3 dims to exactly this Triton kernel and keeps [0].
        return selective_log_softmax_and_entropy(logits, index, temperature=temperature)[0]

    p.trl_select = trl_selective_log_softmax
    p.trl_label = "TRL 1.16 (trl.kernels)"
    p.notes.append(
        "TRL rows call trl.kernels.selective_log_softmax_and_entropy(...)[0], the kernel that "
        f"trl.trainer.utils.selective_log_softmax runs on CUDA; that module did not import ({first})."
    )


def _load_liger(p: Peers) -> None:
    try:
        from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        p.liger_select, p.liger_loss = fused_selective_log_softmax, triton_grpo_loss
    except Exception as exc:  # noqa: BLE001
        p.liger_reason = f"import liger_kernel failed: {_short(exc)}"


def _without_validation(fn: Callable) -> dict:
    """validate=False where the function has it: input checks are not the work being timed."""
    try:
        return {"validate": False} if "validate" in inspect.signature(fn).parameters else {}
    except (TypeError, ValueError):
        return {}


_COMPILED: dict[Callable, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn), once per function; static shapes so each vocabulary gets its own kernels."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def _raise_recompile_limits() -> None:
    # Each function meets several shapes and grad modes; the default limit of 8 could be reached.
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)


# --------------------------------------------------------------------------------------------
# Device: timing and memory, with a CPU stand-in for the smoke run
# --------------------------------------------------------------------------------------------

@dataclass
class Timing:
    median_ms: float
    spread: float  # (p80 - p20) / median: differences smaller than this are noise
    reps: int
    repeats: list[float] = field(default_factory=list)  # medians of independent repeats, when repeated

    @property
    def low(self) -> float:
        return min(self.repeats) if self.repeats else self.median_ms

    @property
    def high(self) -> float:
        return max(self.repeats) if self.repeats else self.median_ms


def repeated(time_once: Callable[[], Timing], repeats: int) -> Timing:
    """Time `repeats` times; the median of the medians, their range, the widest within-repeat spread."""
    if repeats <= 1:
        return time_once()
    runs = [time_once() for _ in range(repeats)]
    medians = [r.median_ms for r in runs]
    return Timing(statistics.median(medians), max(r.spread for r in runs), sum(r.reps for r in runs), medians)


class Device:
    def __init__(self, kind: str, budget_ms: float, max_reps: int):
        self.kind = kind
        self.budget_ms = budget_ms
        self.max_reps = max_reps
        self.flush_buf = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=kind) if kind == "cuda" else None

    @property
    def cuda(self) -> bool:
        return self.kind == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def _one(self, fn, restore):
        """Time one call; restore and the L2 flush are queued before the start event."""
        if restore is not None:
            restore()
        if self.cuda:
            self.flush_buf.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            return start, end
        t0 = time.perf_counter()
        fn()
        return t0, time.perf_counter()

    def _elapsed(self, pairs) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [s.elapsed_time(e) for s, e in pairs]
        return [(e - s) * 1e3 for s, e in pairs]

    def time(self, fn: Callable, restore: Callable | None = None, warmup: int = 2, min_reps: int = 5) -> Timing:
        warm = self._elapsed([self._one(fn, restore) for _ in range(warmup)])
        est = max(min(warm), 1e-3)
        reps = int(min(self.max_reps, max(min_reps, math.ceil(self.budget_ms / est))))
        times = sorted(self._elapsed([self._one(fn, restore) for _ in range(reps)]))
        med = statistics.median(times)
        p20, p80 = times[int(0.2 * (reps - 1))], times[int(math.ceil(0.8 * (reps - 1)))]
        return Timing(med, (p80 - p20) / med if med > 0 else 0.0, reps)

    def peak_extra(self, fn: Callable, restore: Callable | None = None) -> int | None:
        """Peak bytes allocated during one call beyond what was already allocated (the inputs)."""
        if not self.cuda:
            return None
        if restore is not None:
            restore()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak


def copy_bandwidth(dev: Device, nbytes: int) -> tuple[float, Timing]:
    """Device-to-device copy rate in bytes/s, counting the bytes read plus the bytes written."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=dev.kind)  # not zeros
    dst = torch.empty_like(src)
    t = dev.time(lambda: dst.copy_(src), warmup=3, min_reps=20)
    del src, dst
    dev.free()
    return 2 * nbytes / (t.median_ms * 1e-3), t


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------

@dataclass
class Impl:
    key: str  # stable short id (pytest parameter)
    name: str
    fn: Callable[[], tuple] | None = None  # one call of the timed work -> (output, grad or None)
    restore: Callable[[], None] | None = None  # untimed before every call: fresh logits
    role: str = ""  # "ours" / "ref": the rows every other row is checked against
    na: str = ""
    compare: bool = True  # False for a row that computes something else (a cost breakdown)


@dataclass
class Case:
    title: str
    shape: str
    bytes_moved: int
    bytes_note: str
    impls: list[Impl]
    restore_ms: float | None = None  # cost of the fresh-logits copy, paid by in-place rows
    notes: list[str] = field(default_factory=list)
    repeats: int = 1  # set for launch-bound cases (see LAUNCH_BOUND_MS)


def make_impl(key: str, name: str, build: Callable[[], tuple], role: str = "", compare: bool = True) -> Impl:
    """build() -> (fn, restore); an Unavailable or any other error becomes an n/a row."""
    try:
        fn, restore = build()
        return Impl(key, name, fn, restore, role, compare=compare)
    except Unavailable as exc:
        return Impl(key, name, role=role, na=f"n/a ({exc})", compare=compare)
    except Exception as exc:  # noqa: BLE001
        return Impl(key, name, role=role, na=f"n/a ({_short(exc)})", compare=compare)


class LogitsInputs:
    """One vocabulary's inputs, shared by every row: the same random data for every peer.

    `buf` is [B, T+1, V] like a causal LM's output before the last position is dropped: Liger's
    kernels take that layout, the rest take the strided view buf[:, :-1] as trainers pass it.
    """

    def __init__(self, B: int, T: int, V: int, device: str, ref: Any, seed: int):
        gen = torch.Generator(device=device).manual_seed(seed)
        self.B, self.T, self.V = B, T, V
        self.buf = torch.randn((B, T + 1, V), generator=gen, device=device, dtype=torch.bfloat16)
        self.pristine = self.buf.clone()
        self.index = torch.randint(0, V, (B, T), generator=gen, device=device)
        self.grad_out = torch.randn((B, T), generator=gen, device=device, dtype=torch.float32)
        # Policy log-probs from the reference, one sequence at a time to bound the fp32 copy.
        with torch.no_grad():
            logp = torch.stack([ref.selective_logprobs(self.view[b], self.index[b]) for b in range(B)])
        self.old = (logp + OLD_NOISE * torch.randn(logp.shape, generator=gen, device=device)).contiguous()
        self.ref_logps = (logp + REF_NOISE * torch.randn(logp.shape, generator=gen, device=device)).contiguous()
        self.adv = torch.randn((B,), generator=gen, device=device)
        lengths = torch.randint(int((1 - MAX_PAD) * T), T + 1, (B,), generator=gen, device=device)
        self.mask = torch.arange(T, device=device)[None, :] < lengths[:, None]  # bool, right padding
        self.valid = int(self.mask.sum())

    @property
    def view(self) -> torch.Tensor:
        return self.buf[:, :-1]

    def leaf(self) -> torch.Tensor:
        """The strided logits view as an autograd leaf sharing the buffer (in-place grads land in buf)."""
        return self.view.detach().requires_grad_()

    def restore(self) -> None:
        with torch.no_grad():
            self.buf.copy_(self.pristine)


def _grad(out: torch.Tensor, leaf: torch.Tensor, grad_out: torch.Tensor | None = None) -> torch.Tensor:
    # autograd.grad hands back the gradient as computed: no AccumulateGrad copy into .grad.
    # An in-place backward can hand back the saved logits themselves, still flagged as needing
    # grad; detach (no copy) so later checks treat it as plain data.
    return torch.autograd.grad(out, leaf, grad_outputs=grad_out)[0].detach()


def selective_forward_case(x: LogitsInputs, peers: Peers, use_compile: bool) -> Case:
    N, V = x.B * x.T, x.V
    view, index = x.view, x.index

    def no_grad(call):
        def fn():
            with torch.no_grad():
                return call(), None
        return fn

    def ours():
        f = peers.our("selective_logprobs")
        return no_grad(lambda: f(view, index, temperature=TEMPERATURE, validate=False)), None

    def ours_entropy():
        f = peers.our("selective_logprobs")
        return no_grad(lambda: f(view, index, temperature=TEMPERATURE, return_entropy=True, validate=False)[0]), None

    def eager():
        f = peers.reference("selective_logprobs")
        kw = _without_validation(f)
        return no_grad(lambda: f(view, index, temperature=TEMPERATURE, **kw)), None

    def compiled_ref():
        _check_compile(use_compile)
        f = compiled(_ref_selective_fn(peers))
        return no_grad(lambda: f(view, index)), None

    def trl():
        f = peers.trl()
        return no_grad(lambda: f(view, index, temperature=TEMPERATURE)), None

    def liger():
        f = peers.liger("select")
        # Liger reads [B, T+1, V], drops the last position itself; temperature defaults to 0.9.
        return no_grad(lambda: f(x.buf, index, temperature=TEMPERATURE)), None

    impls = [
        make_impl("ours", "ours", ours, "ours"),
        make_impl("ours_entropy", "ours, with entropy", ours_entropy),
        make_impl("eager", "eager reference", eager, "ref"),
        make_impl("compile", "torch.compile(reference)", compiled_ref),
        make_impl("trl", peers.trl_label, trl),
        make_impl("liger", "Liger fused_selective_log_softmax", liger),
    ]
    return Case(
        title=f"Selective log-prob, forward (no grad), V={V}",
        shape=f"logits [{x.B}, {x.T}, {V}] bf16 (strided view of [{x.B}, {x.T + 1}, {V}]), N={N}",
        bytes_moved=N * V * 2 + N * (8 + 4),
        bytes_note="read logits once (N*V*2) + index + log-probs",
        impls=impls,
        notes=["TRL's kernel also computes the entropy on every call; the 'with entropy' row is its match."],
    )


def selective_fwd_bwd_case(x: LogitsInputs, peers: Peers, use_compile: bool) -> Case:
    N, V = x.B * x.T, x.V
    index, g = x.index, x.grad_out

    def rows(call_factory, inplace=False):
        leaf = x.leaf()

        def fn():
            out = call_factory(leaf)
            return out.detach(), _grad(out, leaf, g)

        return fn, (x.restore if inplace else None)

    def ours(inplace):
        def build():
            f = peers.our("selective_logprobs")
            return rows(lambda t: f(t, index, temperature=TEMPERATURE, inplace_backward=inplace, validate=False), inplace)
        return build

    def eager():
        f = peers.reference("selective_logprobs")
        kw = _without_validation(f)
        return rows(lambda t: f(t, index, temperature=TEMPERATURE, **kw))

    def compiled_ref():
        _check_compile(use_compile)
        f = compiled(_ref_selective_fn(peers))
        return rows(lambda t: f(t, index))

    def trl():
        f = peers.trl()
        return rows(lambda t: f(t, index, temperature=TEMPERATURE))

    def liger():
        peers.liger("select")
        raise Unavailable("fused_selective_log_softmax is forward-only (torch.no_grad)")

    impls = [
        make_impl("ours", "ours", ours(False), "ours"),
        make_impl("ours_inplace", "ours, in-place backward", ours(True)),
        make_impl("eager", "eager reference", eager, "ref"),
        make_impl("compile", "torch.compile(reference)", compiled_ref),
        make_impl("trl", peers.trl_label, trl),
        make_impl("liger", "Liger fused_selective_log_softmax", liger),
    ]
    return Case(
        title=f"Selective log-prob, forward+backward, V={V}",
        shape=f"logits [{x.B}, {x.T}, {V}] bf16 (strided view), N={N}, random d(logp)",
        bytes_moved=3 * N * V * 2 + N * (8 + 4 + 4),
        bytes_note="read logits forward + read again backward + write d(logits) (3*N*V*2)",
        impls=impls,
    )


def loss_from_logits_case(x: LogitsInputs, peers: Peers) -> Case:
    N, V = x.B * x.T, x.V
    index, old, ref, adv, mask = x.index, x.old, x.ref_logps, x.adv, x.mask

    def rows(loss_of, leaf_of=None, inplace=False):
        leaf = (leaf_of or x.leaf)()

        def fn():
            loss = loss_of(leaf)
            return loss.detach(), _grad(loss, leaf)

        return fn, (x.restore if inplace else None)

    def ours(inplace, entropy=False):
        def build():
            f = peers.our("grpo_loss_from_logits")
            extra = {"return_entropy": True} if entropy else {}
            return rows(
                lambda t: f(t, index, old, ref, adv, mask, temperature=TEMPERATURE,
                            inplace_backward=inplace, validate=False, **extra, **LOSS_OPTIONS)[0],
                inplace=inplace,
            )
        return build

    def eager():
        f = peers.reference("grpo_loss_from_logits")
        return rows(lambda t: f(t, index, old, ref, adv, mask, temperature=TEMPERATURE, **LOSS_OPTIONS)[0])

    def trl_path():
        # TRL's log-probs (its Triton kernel) feeding the plain-torch loss written to TRL's semantics.
        select, loss_fn = peers.trl(), peers.reference("grpo_loss")
        return rows(lambda t: loss_fn(select(t, index, temperature=TEMPERATURE), old, ref, adv, mask, **LOSS_OPTIONS)[0])

    def liger(inplace):
        def build():
            f = peers.liger("loss")
            full_leaf = lambda: x.buf.detach().requires_grad_()  # noqa: E731 - Liger wants [B, T+1, V]
            # Every default that differs from TRL's semantics is spelled out: temperature 0.9,
            # eps_high 0.4, loss_type "dapo", reduce=False.
            return rows(
                lambda t: f(t, old, ref, index, adv, mask, temperature=TEMPERATURE, beta=LOSS_OPTIONS["beta"],
                            eps_low=LOSS_OPTIONS["epsilon_low"], eps_high=LOSS_OPTIONS["epsilon_high"],
                            inplace=inplace, loss_type=LOSS_OPTIONS["loss_type"], reduce=True)[0],
                leaf_of=full_leaf, inplace=inplace,
            )
        return build

    impls = [
        make_impl("ours_inplace", "ours, in-place backward", ours(True), "ours"),
        make_impl("ours", "ours, out-of-place backward", ours(False)),
        make_impl("ours_entropy", "ours, in-place, + entropy metric", ours(True, entropy=True)),
        make_impl("eager", "eager reference", eager, "ref"),
        make_impl("trl", f"TRL path: {peers.trl_label} + reference.grpo_loss", trl_path),
        make_impl("liger_inplace", "Liger triton_grpo_loss, inplace=True", liger(True)),
        make_impl("liger", "Liger triton_grpo_loss, inplace=False", liger(False)),
    ]
    fwd_read = x.valid * V * 2
    return Case(
        title=f"GRPO loss from logits, forward+backward, V={V}",
        shape=(f"logits [{x.B}, {x.T}, {V}] bf16, {x.valid}/{N} tokens unmasked, beta={LOSS_OPTIONS['beta']}, "
               f"eps={LOSS_OPTIONS['epsilon_low']}, loss_type={LOSS_OPTIONS['loss_type']}, old+ref log-probs"),
        bytes_moved=2 * fwd_read + N * V * 2 + N * (8 + 4 + 4 + 1),
        bytes_note="read unmasked logits forward and backward + write d(logits) for every token",
        impls=impls,
        notes=["The logits here are an autograd leaf (a strided view of a [B, T+1, V] buffer), the kernel "
               "measured alone. The trainer's path, through a model head, is the LM-head case."],
    )


class HeadInputs:
    """A real Qwen2 LM head and what the trainer feeds it, for the loss measured as it runs there.

    The head is `Qwen2ForCausalLM(...).lm_head` at the given width (tied to the input embedding,
    as in Qwen2.5-0.5B), bf16. `hidden` [B, C+1, H] stands in for the decoder's final hidden
    states: a leaf, so backward ends at it. Each call runs the head forward, so the logits
    [B, C+1, V] are a fresh non-leaf every time, exactly what `completion_logits` returns.
    """

    def __init__(self, B: int, C: int, H: int, V: int, device: str, ref: Any, seed: int):
        from transformers import Qwen2Config, Qwen2ForCausalLM

        gen = torch.Generator(device=device).manual_seed(seed)
        cfg = Qwen2Config(vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=1,
                          num_attention_heads=max(1, H // 64), num_key_value_heads=1, tie_word_embeddings=True)
        torch.manual_seed(seed)
        with torch.device(device):
            self.head = Qwen2ForCausalLM(cfg).to(torch.bfloat16).lm_head  # the rest of the model is dropped
        self.B, self.C, self.H, self.V = B, C, H, V
        # Unit-variance hidden states make logits of std ~0.6 at init: spread them to a trained
        # model's few units so the softmax is not flat.
        self.hidden = (4 * torch.randn((B, C + 1, H), generator=gen, device=device)).to(torch.bfloat16)
        self.hidden.requires_grad_()
        self.index = torch.randint(0, V, (B, C), generator=gen, device=device)
        with torch.no_grad():
            logits = self.head(self.hidden)
            logp = torch.stack([ref.selective_logprobs(logits[b, :-1], self.index[b]) for b in range(B)])
            del logits
        self.old = (logp + OLD_NOISE * torch.randn(logp.shape, generator=gen, device=device)).contiguous()
        self.ref_logps = (logp + REF_NOISE * torch.randn(logp.shape, generator=gen, device=device)).contiguous()
        self.adv = torch.randn((B,), generator=gen, device=device)
        lengths = torch.randint(int((1 - MAX_PAD) * C), C + 1, (B,), generator=gen, device=device)
        self.mask = torch.arange(C, device=device)[None, :] < lengths[:, None]
        self.valid = int(self.mask.sum())
        self.params = (self.hidden, self.head.weight)

    @property
    def logits_bytes(self) -> int:
        return self.B * (self.C + 1) * self.V * 2


def head_loss_case(h: HeadInputs, peers: Peers) -> Case:
    """Forward through the head, the fused loss, backward into the hidden states and the weight."""
    index, old, ref, adv, mask = h.index, h.old, h.ref_logps, h.adv, h.mask

    def through_head(loss_of):
        def fn():
            logits = h.head(h.hidden)  # [B, C+1, V], a non-leaf: what the trainer passes
            loss = loss_of(logits)
            d_hidden, _d_weight = torch.autograd.grad(loss, h.params)
            return loss.detach(), d_hidden
        return fn, None

    def ours(sliced):
        def build():
            f = peers.our("grpo_loss_from_logits")
            cut = (lambda t: t[:, :-1]) if sliced else (lambda t: t)
            return through_head(lambda t: f(cut(t), index, old, ref, adv, mask, temperature=TEMPERATURE,
                                            validate=False, **LOSS_OPTIONS)[0])
        return build

    def eager():
        f = peers.reference("grpo_loss_from_logits")
        return through_head(lambda t: f(t, index, old, ref, adv, mask, temperature=TEMPERATURE, **LOSS_OPTIONS)[0])

    def liger():
        f = peers.liger("loss")
        return through_head(lambda t: f(t, old, ref, index, adv, mask, temperature=TEMPERATURE, beta=LOSS_OPTIONS["beta"],
                                        eps_low=LOSS_OPTIONS["epsilon_low"], eps_high=LOSS_OPTIONS["epsilon_high"],
                                        inplace=True, loss_type=LOSS_OPTIONS["loss_type"], reduce=True)[0])

    def head_alone():
        # The matmuls the loss rides on: head forward, then backward of a fixed d(logits) (an
        # input, outside the peak). The loss's own cost is the other rows minus this one.
        g = torch.zeros((h.B, h.C + 1, h.V), device=h.hidden.device, dtype=torch.bfloat16)

        def fn():
            logits = h.head(h.hidden)
            torch.autograd.grad(logits, h.params, grad_outputs=g)
            return torch.zeros((), device=h.hidden.device), None
        return fn, None

    impls = [
        make_impl("ours", "ours, unshifted head output (the trainer's path)", ours(False), "ours"),
        make_impl("ours_sliced", "ours, head output sliced [:, :-1] (the previous trainer path)", ours(True)),
        make_impl("liger", "Liger triton_grpo_loss, inplace=True, same unshifted logits", liger),
        make_impl("eager", "eager reference, unshifted", eager, "ref"),
        make_impl("head", "head alone: forward + backward of a fixed d(logits)", head_alone, compare=False),
    ]
    N, V = h.B * h.C, h.V
    fwd_read = h.valid * V * 2
    return Case(
        title=f"GRPO loss through a Qwen2 LM head, forward+backward, V={V}",
        shape=(f"hidden [{h.B}, {h.C + 1}, {h.H}] bf16 -> Qwen2 lm_head (tied, bf16) -> logits [{h.B}, {h.C + 1}, {V}] "
               f"({_fmt_bytes(h.logits_bytes)}, a non-leaf) -> loss; backward into hidden and lm_head.weight; "
               f"{h.valid}/{N} tokens unmasked, beta={LOSS_OPTIONS['beta']}, loss_type={LOSS_OPTIONS['loss_type']}"),
        bytes_moved=2 * fwd_read + N * V * 2 + N * (8 + 4 + 4 + 1),
        bytes_note="the loss's logits traffic only; the head's matmuls come on top, see 'head alone'",
        impls=impls,
        notes=[f"'peak extra' includes the logits the head allocates ({_fmt_bytes(h.logits_bytes)}) and "
               f"d(weight) ({_fmt_bytes(h.V * h.H * 2)}): a loss that adds nothing beyond them peaks near "
               f"'head alone'. 'vs ours' compares the loss and d(hidden)."],
    )


class TokenInputs:
    def __init__(self, B: int, T: int, device: str, seed: int):
        gen = torch.Generator(device=device).manual_seed(seed)
        u = torch.rand((B, T), generator=gen, device=device).clamp_min(1e-6)
        self.logps = torch.log(u)  # log-probs are <= 0
        self.old = self.logps + OLD_NOISE * torch.randn((B, T), generator=gen, device=device)
        self.ref_logps = self.logps + REF_NOISE * torch.randn((B, T), generator=gen, device=device)
        self.adv = torch.randn((B,), generator=gen, device=device)
        lengths = torch.randint(int((1 - MAX_PAD) * T), T + 1, (B,), generator=gen, device=device)
        self.mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
        self.B, self.T = B, T


def token_loss_case(t: TokenInputs, peers: Peers, use_compile: bool, backward: bool) -> Case:
    N = t.B * t.T
    args = (t.old, t.ref_logps, t.adv, t.mask)

    def rows(get_fn):
        def build():
            f = get_fn()
            leaf = t.logps.detach().requires_grad_(backward)

            def fn():
                if not backward:
                    with torch.no_grad():
                        return f(leaf, *args, **LOSS_OPTIONS)[0], None
                loss = f(leaf, *args, **LOSS_OPTIONS)[0]
                return loss.detach(), _grad(loss, leaf)

            return fn, None
        return build

    def compiled_ref():
        _check_compile(use_compile)
        peers.reference("grpo_loss")
        return compiled(_ref_token_loss_fn(peers))

    impls = [
        make_impl("ours", "ours", rows(lambda: peers.our("grpo_loss")), "ours"),
        make_impl("eager", "eager reference", rows(lambda: peers.reference("grpo_loss")), "ref"),
        make_impl("compile", "torch.compile(reference)", rows(compiled_ref)),
    ]
    reads = N * (4 * 3 + 1) + t.B * 4  # logps, old, ref (fp32), mask (bool), advantages
    return Case(
        title=f"GRPO loss on token log-probs, {'forward+backward' if backward else 'forward (no grad)'}",
        shape=f"[{t.B}, {t.T}] fp32 log-probs, old, ref, bool mask, beta={LOSS_OPTIONS['beta']}",
        bytes_moved=reads + (N * 4 if backward else 0),
        bytes_note="read logps, old, ref, mask once" + (" + write d(logp)" if backward else ""),
        impls=impls,
    )


def advantages_case(B: int, G: int, device: str, peers: Peers, use_compile: bool, seed: int) -> Case:
    gen = torch.Generator(device=device).manual_seed(seed)
    rewards = torch.randn((B,), generator=gen, device=device)

    def rows(get_fn):
        def build():
            f = get_fn()

            def fn():
                with torch.no_grad():
                    return f(rewards, G)[0], None

            return fn, None
        return build

    def compiled_ref():
        _check_compile(use_compile)
        peers.reference("group_advantages")
        return compiled(_ref_advantages_fn(peers))

    impls = [
        make_impl("ours", "ours", rows(lambda: peers.our("group_advantages")), "ours"),
        make_impl("eager", "eager reference", rows(lambda: peers.reference("group_advantages")), "ref"),
        make_impl("compile", "torch.compile(reference)", rows(compiled_ref)),
    ]
    return Case(
        title="Group advantages (scale='group')",
        shape=f"rewards [{B}] fp32, G={G}",
        bytes_moved=B * 8 + (B // G) * 8,
        bytes_note="read rewards, write advantages + per-group mean and std; launch-bound at this size",
        impls=impls,
    )


def _check_compile(use_compile: bool) -> None:
    if not use_compile:
        raise Unavailable("skipped: --no-compile")


# Module-level wrappers: torch.compile caches per function, so one wrapper per reference op.
_REF = None


def _ref_selective(logits, index):
    return _REF.selective_logprobs(logits, index, temperature=TEMPERATURE, **_without_validation(_REF.selective_logprobs))


def _ref_token_loss(logps, old, ref, adv, mask, **options):
    return _REF.grpo_loss(logps, old, ref, adv, mask, **options)


def _ref_advantages(rewards, group_size):
    return _REF.group_advantages(rewards, group_size)


def _ref_selective_fn(peers: Peers) -> Callable:
    global _REF
    peers.reference("selective_logprobs")
    _REF = peers.ref
    return _ref_selective


def _ref_token_loss_fn(peers: Peers) -> Callable:
    global _REF
    _REF = peers.ref
    return _ref_token_loss


def _ref_advantages_fn(peers: Peers) -> Callable:
    global _REF
    _REF = peers.ref
    return _ref_advantages


# --------------------------------------------------------------------------------------------
# Running a case: agreement, time, memory
# --------------------------------------------------------------------------------------------

@dataclass
class Row:
    name: str
    timing: Timing | None = None
    peak: int | None = None
    inplace: bool = False
    vs_ours: str = ""
    vs_ref: str = ""
    sane: str = ""
    note: str = ""


def _leading(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Liger's d(logits) covers [B, T+1, V]; the last position is not a token: drop it."""
    if grad.dim() == 3 and like.dim() == 3 and grad.shape[1] == like.shape[1] + 1:
        return grad[:, :-1]
    return grad


def _row_blocks(t: torch.Tensor, rows: int):
    """Blocks of at most `rows` rows of the last two dims; views only, even for strided logits."""
    t3 = t.reshape(-1, t.shape[-2], t.shape[-1]) if t.dim() >= 2 else t.reshape(1, 1, -1)
    for mat in t3:
        for i in range(0, mat.shape[0], rows):
            yield mat[i:i + rows]


def _rel_l2(a: torch.Tensor, b: torch.Tensor, rows: int = 256) -> float:
    """||a - b|| / ||b|| in float64, block by block so [N, V] tensors need no full-size copy."""
    num = den = 0.0
    for x, y in zip(_row_blocks(a, rows), _row_blocks(b, rows)):
        x, y = x.double(), y.double()
        num += float(((x - y) ** 2).sum())
        den += float((y ** 2).sum())
    return math.sqrt(num) / math.sqrt(den) if den > 0 else math.sqrt(num)


def _compare(res: tuple, base: tuple | None) -> str:
    if base is None:
        return ""
    out, grad = res
    # No "|" in the text: it lands in a markdown table cell.
    text = f"out Δmax {float((out.double() - base[0].double()).abs().max()):.1e}"
    if grad is not None and base[1] is not None:
        text += f", grad rel {_rel_l2(_leading(grad, base[1]), base[1]):.1e}"
    return text


def _sanity(res: tuple, is_logp: bool) -> str:
    out, grad = res
    problems = []
    if not bool(torch.isfinite(out).all()):
        problems.append("non-finite output")
    if is_logp and float(out.max()) > 1e-6:
        problems.append(f"log-prob > 0 ({float(out.max()):.2e})")
    if grad is not None and not bool(torch.isfinite(grad).all()):
        problems.append("non-finite grad")
    return "ok" if not problems else "FAIL: " + "; ".join(problems)


def run_case(case: Case, dev: Device, is_logp: bool) -> list[Row]:
    rows = [Row(i.name, inplace=i.restore is not None, note=i.na) for i in case.impls]
    print(f"\n== {case.title}\n   {case.shape}", flush=True)

    # Agreement first; it is also the warm-up that triggers every JIT and torch.compile.
    results: dict[str, tuple | None] = {}
    order = sorted(range(len(case.impls)), key=lambda k: {"ours": 0, "ref": 1}.get(case.impls[k].role, 2))
    for k in order:
        impl, row = case.impls[k], rows[k]
        if impl.fn is None:
            continue
        try:
            if impl.restore:
                impl.restore()
            out, grad = impl.fn()
            dev.sync()
            if impl.restore and grad is not None:
                grad = grad.clone()  # it lives in the logits buffer, which the next restore refills
            res = (out.detach(), grad)
            row.sane = _sanity(res, is_logp)
            if impl.role:
                results[impl.role] = res
            row.vs_ours = _compare(res, results.get("ours")) if impl.role != "ours" and impl.compare else ""
            row.vs_ref = _compare(res, results.get("ref")) if impl.role != "ref" and impl.compare else ""
            if impl.role == "ref" and "ours" in results:
                # The reference ran after ours: fill in ours-vs-reference now.
                rows[order[0]].vs_ref = _compare(results["ours"], res)
        except Exception as exc:  # noqa: BLE001 - a broken peer must not stop the run
            row.note = f"error: {_short(exc)}"
            impl.fn = None
            _log_exception(impl.name, exc)
        finally:
            if impl.restore:
                impl.restore()
        dev.free()
    results.clear()
    dev.free()

    for impl, row in zip(case.impls, rows):
        if impl.fn is None:
            print(f"   {impl.name:58s} {row.note}", flush=True)
            continue
        try:
            row.timing = repeated(lambda: dev.time(impl.fn, impl.restore), case.repeats)
            row.peak = dev.peak_extra(impl.fn, impl.restore)
            extra = f"  (min {row.timing.low:.4f}, max {row.timing.high:.4f} over {case.repeats} repeats)" \
                if case.repeats > 1 else ""
            print(f"   {impl.name:58s} {row.timing.median_ms:9.4f} ms  ±{100 * row.timing.spread:4.1f}%{extra}", flush=True)
        except Exception as exc:  # noqa: BLE001
            row.timing, row.note = None, f"error: {_short(exc)}"
            _log_exception(impl.name, exc)
        finally:
            if impl.restore:
                impl.restore()
        dev.free()
    return rows


def _log_exception(name: str, exc: BaseException) -> None:
    print(f"   [{name}] {_short(exc)}", file=sys.stderr, flush=True)
    if os.environ.get("BENCH_TRACEBACK"):
        traceback.print_exception(exc)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.3f}" if ms >= 0.1 else f"{ms:.4f}"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def case_table(case: Case, rows: list[Row], copy_bw: float) -> str:
    floor_ms = case.bytes_moved / copy_bw * 1e3
    ours = next((r for r, i in zip(rows, case.impls) if i.role == "ours"), None)
    ours_ms = ours.timing.median_ms if ours and ours.timing else None
    head = ["impl", "ms", "±", "+ restore ms", "TB/s", "% copy BW", "floor ms", "time / ours",
            "peak extra", "vs ours", "vs eager ref", "sane"]
    if case.repeats > 1:
        head.insert(2, f"min-max of {case.repeats} repeats")
    lines = [
        f"### {case.title}",
        "",
        f"{case.shape}. Bytes that must move: {case.bytes_moved / 1e9:.4g} GB ({case.bytes_note}); "
        f"floor at the measured copy rate: {_fmt_ms(floor_ms)} ms."
        + (f" Fresh-logits copy (untimed, per call of in-place rows): {_fmt_ms(case.restore_ms)} ms."
           if case.restore_ms is not None else ""),
        "",
    ]
    if case.repeats > 1:
        lines += [
            f"Launch-bound (floor under {LAUNCH_BOUND_MS} ms): each row was timed {case.repeats} times; 'ms' is "
            "the median of those medians, and 'time / ours' gives the ratio of medians with, in brackets, the "
            "range that the repeats allow. Other hosts and runs can fall outside it.",
            "",
        ]
    lines += [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        if r.timing is None:
            lines.append(f"| {r.name} | {r.note or 'n/a'} |" + " |" * (len(head) - 2))
            continue
        ms = r.timing.median_ms
        tbs = case.bytes_moved / (ms * 1e-3) / 1e12
        ratio = "-"
        if ours_ms:
            ratio = f"{ms / ours_ms:.2f}x"
            if case.repeats > 1 and r is not ours:
                ratio += f" ({r.timing.low / ours.timing.high:.2f}-{r.timing.high / ours.timing.low:.2f}x)"
        cells = [
            r.name,
            _fmt_ms(ms),
            *([f"{_fmt_ms(r.timing.low)}-{_fmt_ms(r.timing.high)}"] if case.repeats > 1 else []),
            f"{100 * r.timing.spread:.1f}%",
            _fmt_ms(ms + case.restore_ms) if r.inplace and case.restore_ms is not None else "-",
            f"{tbs:.3f}",
            f"{100 * case.bytes_moved / (ms * 1e-3) / copy_bw:.1f}%",
            _fmt_ms(floor_ms),
            ratio,
            _fmt_bytes(r.peak),
            r.vs_ours or ("(this is ours)" if r is ours else "-"),
            r.vs_ref or "-",
            r.sane or "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for note in case.notes:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def _git_commit() -> str:
    # Copies of the tree without .git (a GPU box) can name the commit they were made from.
    if os.environ.get("ATLAS_FAST_COMMIT"):
        return os.environ["ATLAS_FAST_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "n/a (no commit or no .git)"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "n/a (git unavailable)"


def _kernels_digest() -> str:
    """Hash of the kernel sources: ties the numbers to the code even without a commit."""
    h = hashlib.sha256()
    for path in sorted((REPO / "kernels").glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def header(dev: Device, shapes: Shapes, mode: str, copy: tuple[float, Timing, int], peers: Peers) -> str:
    import triton

    copy_bw, copy_t, copy_bytes = copy
    if dev.cuda:
        prop = torch.cuda.get_device_properties(0)
        card = f"{torch.cuda.get_device_name(0)} ({prop.multi_processor_count} SMs, {prop.total_memory / 2**30:.0f} GiB)"
    else:
        card = f"CPU ({platform.processor() or platform.machine()}), smoke run: numbers mean nothing"
    lines = [
        "## Kernel benchmarks (`benchmarks/bench_kernels.py`)",
        "",
        f"- card: {card}",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- mode: {mode}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"triton {triton.__version__}, trl {_version('trl')}, liger-kernel {_version('liger-kernel')}",
        f"- commit: {_git_commit()}; kernels/*.py sha256 {_kernels_digest()}",
        f"- shapes: logits B={shapes.batch}, T={shapes.seq}, V in {list(shapes.vocabs)}, bf16; token loss "
        f"[{shapes.tok_batch}, {shapes.tok_seq}]; advantages B={shapes.adv_batch}, G={shapes.group}; "
        f"LM head H={shapes.head_hidden}, V={shapes.head_vocab}",
        f"- copy bandwidth (device-to-device, {copy_bytes / 2**20:.0f} MiB, read + write counted): "
        f"{copy_bw / 1e12:.3f} TB/s ({copy_t.median_ms:.3f} ms, ±{100 * copy_t.spread:.1f}%)",
        "- method: median of CUDA-event timings per call after warm-up, L2 flushed (256 MiB write) "
        "before each call; in-place rows get a fresh logits copy before each call, outside the timed "
        "region ('+ restore ms' adds it back). 'peak extra' = max_memory_allocated during one call minus "
        "memory allocated before it. 'vs ours' / 'vs eager ref': 'out Δmax' = largest absolute difference "
        "of the output (log-probs or loss), 'grad rel' = ||Δgrad|| / ||grad|| of d(logits) or d(logp), "
        "computed in float64. 'time / ours' > 1 means ours is faster. Launch-bound cases (byte floor under "
        f"{LAUNCH_BOUND_MS} ms) are timed several times over and report the range.",
    ]
    for note in peers.notes:
        lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


def write_results(path: Path, body: str) -> None:
    """Replace this script's section of the file (between the markers), or append one."""
    results_md.write_section(path, "kernels", body)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes: a smoke test of the GPU path")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown file to update (default: %(default)s)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (saves compile time)")
    ap.add_argument("--only", default="", help="comma list of case groups: select,loss,head,token,adv (default all)")
    ap.add_argument("--repeats", type=int, default=REPEATS,
                    help="timings per row of a launch-bound case, reported as a range (default %(default)s)")
    ap.add_argument("--budget-ms", type=float, default=None, help="timed milliseconds per row (default 300, quick 60)")
    ap.add_argument("--peers", action="store_true", help="print which implementations import, then exit")
    ap.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def print_peers(peers: Peers) -> None:
    print(f"ours:      {'ok' if peers.ours else peers.ours_reason}")
    print(f"reference: {'ok' if peers.ref else peers.ref_reason}")
    print(f"trl:       {peers.trl_label if peers.trl_select else peers.trl_reason}")
    print(f"liger:     {'ok' if peers.liger_loss else peers.liger_reason}")
    for note in peers.notes:
        print(f"note: {note}")


def main(argv=None) -> int:
    args = parse_args(argv)
    peers = load_peers()
    if args.peers:
        print_peers(peers)
        return 0
    if args.cpu_smoke:
        kind, shapes, mode = "cpu", CPU_SMOKE, "cpu-smoke"
    elif not torch.cuda.is_available():
        print("bench_kernels.py times CUDA kernels and needs a CUDA GPU; none is visible "
              f"(torch {torch.__version__}). Use --peers to check imports here.", file=sys.stderr)
        return 2
    else:
        kind, shapes, mode = "cuda", (QUICK if args.quick else FULL), ("quick" if args.quick else "full")
    budget = args.budget_ms or (60.0 if args.quick or args.cpu_smoke else 300.0)
    dev = Device(kind, budget_ms=budget, max_reps=10 if args.cpu_smoke else 200)
    use_compile = not args.no_compile and not args.cpu_smoke
    groups = set(filter(None, args.only.split(","))) or {"select", "loss", "head", "token", "adv"}
    _raise_recompile_limits()
    print_peers(peers)
    t_start = time.perf_counter()

    copy_bytes = COPY_BYTES if kind == "cuda" else 2**24
    copy_bw, copy_t = copy_bandwidth(dev, copy_bytes)
    print(f"copy bandwidth: {copy_bw / 1e12:.3f} TB/s", flush=True)

    tables: list[str] = []

    def run(case_factory, is_logp, restore_ms=None):
        try:
            case = case_factory()
            case.restore_ms = restore_ms
            if case.bytes_moved / copy_bw * 1e3 < LAUNCH_BOUND_MS:
                case.repeats = max(1, args.repeats)
            rows = run_case(case, dev, is_logp)
            tables.append(case_table(case, rows, copy_bw))
        except Exception as exc:  # noqa: BLE001 - report and move on to the next case
            _log_exception("case", exc)
            tables.append(f"### case failed\n\nerror: {_short(exc)}\n")
        dev.free()

    if groups & {"select", "loss"}:
        for i, V in enumerate(shapes.vocabs):
            try:
                if peers.ref is None:
                    raise Unavailable(f"the inputs need atlas_kernels.reference: {peers.ref_reason}")
                x = LogitsInputs(shapes.batch, shapes.seq, V, kind, peers.ref, seed=1000 + i)
            except Exception as exc:  # noqa: BLE001
                _log_exception(f"inputs V={V}", exc)
                tables.append(f"### V={V}: inputs could not be built\n\nerror: {_short(exc)}\n")
                continue
            restore_ms = dev.time(x.restore, warmup=2, min_reps=10).median_ms
            if "select" in groups:
                run(lambda: selective_forward_case(x, peers, use_compile), True)
                run(lambda: selective_fwd_bwd_case(x, peers, use_compile), True, restore_ms)
            if "loss" in groups:
                run(lambda: loss_from_logits_case(x, peers), False, restore_ms)
            del x
            dev.free()
    if "head" in groups:
        try:
            if peers.ref is None:
                raise Unavailable(f"the inputs need atlas_kernels.reference: {peers.ref_reason}")
            h = HeadInputs(shapes.batch, shapes.seq, shapes.head_hidden, shapes.head_vocab, kind, peers.ref, seed=1500)
            run(lambda: head_loss_case(h, peers), False)
            del h
        except Exception as exc:  # noqa: BLE001
            _log_exception("head inputs", exc)
            tables.append(f"### LM head case: inputs could not be built\n\nerror: {_short(exc)}\n")
        dev.free()
    if "token" in groups:
        t = TokenInputs(shapes.tok_batch, shapes.tok_seq, kind, seed=2000)
        run(lambda: token_loss_case(t, peers, use_compile, backward=False), False)
        run(lambda: token_loss_case(t, peers, use_compile, backward=True), False)
        del t
    if "adv" in groups:
        run(lambda: advantages_case(shapes.adv_batch, shapes.group, kind, peers, use_compile, seed=3000), False)

    elapsed = time.perf_counter() - t_start
    body = header(dev, shapes, mode, (copy_bw, copy_t, copy_bytes), peers) + f"- wall time of this run: {elapsed:.0f} s\n\n"
    body += "\n".join(tables)
    print("\n" + body, flush=True)
    write_results(args.out, body)
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
