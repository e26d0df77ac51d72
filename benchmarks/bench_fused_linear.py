#!/usr/bin/env python
"""Hidden states -> loss, forward + backward, with the LM head fused, against its peers.

N = 8192 tokens (8 sequences of 1024), V = 151936 (Qwen2.5), bf16 hidden states and weight,
H in {896, 1536, 3584}. Logits come out with a standard deviation of about 3 (random weights
scaled by 3 / sqrt(H)), so softmax mass sits on a few hundred tokens as in a trained head.

Rows:
  ours   fused_linear_grpo_loss (beta 0.04, old and reference log-probs, token-level IS) with
         its default plan (one pass in chunks of 1024 tokens x the whole vocabulary, 320 MiB),
         with two sweeps over 64 MiB tiles (8NHV, the least memory), two sweeps with a 1 GiB
         workspace (15 of 38 tiles kept between the sweeps), one pass in chunks of 2048 tokens
         or all N at once, with GSPO, and fused_linear_logprobs (loss = -mean log-prob; its
         backward recomputes the logits);
  plain  bf16 logits (hidden @ weight.T) then fp32 cross-entropy / bf16 cross-entropy / our
         grpo_loss_from_logits (the trainer's logits path);
  peers  Apple CCE 25.1.1 linear_cross_entropy, TRL 1.16 ChunkedLogProbFunction (its GRPO
         default, fused_lm_head=True, vocabulary chunks of 32768), Liger 0.8.5
         LigerFusedLinearGRPOLoss (same GRPO settings as ours). A missing peer reads "n/a".

Each row: median time of forward + backward (CUDA events, after warm-up), TFLOP/s counted as
6*N*H*V (the three GEMMs), peak memory allocated during one forward + backward beyond what was
allocated before it (gradients included: every row must produce d(hidden) and d(weight)), and
a check of its result against a reference (ours and Liger: the loss and d(hidden) of the
plain bf16-logits path; CE rows: fp32 cross-entropy; TRL: its log-probs against ours).

    python benchmarks/bench_fused_linear.py [--quick] [--out benchmarks/RESULTS.md] [--hidden 896 3584]
    python benchmarks/bench_fused_linear.py --cpu-smoke      # tiny shapes on the CPU, harness only

Writes its tables between the markers below in --out, leaving the rest of the file alone.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.metadata
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "RESULTS.md"
MARK_START = "<!-- fused_linear:start -->"
MARK_END = "<!-- fused_linear:end -->"

N_TOKENS, VOCAB, SEQS = 8192, 151936, 8
HIDDENS = (896, 1536, 3584)
LOGIT_STD = 3.0
LOSS = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo")
OLD_NOISE, REF_NOISE = 0.1, 0.1
TRL_VOCAB_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in 1.16
# Targets from the issue, for ours = fused_linear_grpo_loss with the default plan.
TARGET_PLAIN_RATIO = 1.05  # at H = 3584, against plain bf16 logits + bf16 CE
TARGET_LIGER_SPEEDUP = 5.0


@dataclass
class Case:
    H: int
    hidden: "torch.Tensor"  # [N, H]
    weight: "torch.Tensor"  # [V, H]
    index: "torch.Tensor"  # [N]
    old: "torch.Tensor"  # [B, C]
    ref: "torch.Tensor"  # [B, C]
    adv: "torch.Tensor"  # [B]
    mask: "torch.Tensor"  # [B, C]

    @property
    def B(self):
        return self.old.shape[0]

    @property
    def C(self):
        return self.old.shape[1]

    def ids(self):
        return self.index.view(self.B, self.C)


@dataclass
class Row:
    name: str
    ms: float | None = None
    peak: float | None = None  # bytes
    check: str = ""
    note: str = ""


class Unavailable(Exception):
    pass


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def make_case(H: int, n: int, V: int, device, seed: int = 0) -> Case:
    import torch
    from atlas_kernels import fused_linear_logprobs

    g = torch.Generator(device=device).manual_seed(seed + H)
    dtype = torch.bfloat16
    hidden = torch.randn(n, H, generator=g, device=device).to(dtype)
    weight = (torch.randn(V, H, generator=g, device=device) * (LOGIT_STD / H**0.5)).to(dtype)
    index = torch.randint(0, V, (n,), generator=g, device=device)
    with torch.no_grad():
        lp = fused_linear_logprobs(hidden, weight, index)
    B = SEQS if n % SEQS == 0 else 1
    C = n // B
    old = (lp + OLD_NOISE * torch.randn(n, generator=g, device=device)).view(B, C)
    ref = (lp + REF_NOISE * torch.randn(n, generator=g, device=device)).view(B, C)
    adv = torch.randn(B, generator=g, device=device)
    mask = torch.ones(B, C, dtype=torch.bool, device=device)
    return Case(H, hidden, weight, index, old, ref, adv, mask)


# ------------------------------------------------------------------------------------------------
# The rows: each takes (hidden leaf [N, H], weight leaf [V, H], case) and returns a scalar loss
# ------------------------------------------------------------------------------------------------

def ours_grpo(**opts):
    from atlas_kernels import fused_linear_grpo_loss

    def run(h, w, c):
        loss, _ = fused_linear_grpo_loss(h.view(c.B, c.C, -1), w, c.ids(), c.old, c.ref, c.adv, c.mask,
                                         validate=False, **LOSS, **opts)
        return loss
    return run


def ours_logprobs(h, w, c):
    from atlas_kernels import fused_linear_logprobs

    return -fused_linear_logprobs(h, w, c.index, validate=False).mean()


def plain_ce_fp32(h, w, c):
    import torch.nn.functional as F

    return F.cross_entropy((h @ w.t()).float(), c.index)


def plain_ce_bf16(h, w, c):
    import torch.nn.functional as F

    return F.cross_entropy(h @ w.t(), c.index)


def plain_grpo_from_logits(h, w, c):
    from atlas_kernels import grpo_loss_from_logits

    logits = (h @ w.t()).view(c.B, c.C, -1)
    loss, _ = grpo_loss_from_logits(logits, c.ids(), c.old, c.ref, c.adv, c.mask, validate=False, **LOSS)
    return loss


def cce_row():
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as exc:  # noqa: BLE001 - any import failure makes the row n/a
        raise Unavailable(f"cut-cross-entropy: {type(exc).__name__}: {exc}") from exc

    def run(h, w, c):
        return linear_cross_entropy(h, w, c.index)
    return run


def trl_row():
    try:
        from trl.kernels import ChunkedLogProbFunction
    except Exception as exc:  # noqa: BLE001
        raise Unavailable(f"trl: {type(exc).__name__}: {exc}") from exc

    def run(h, w, c):
        out = ChunkedLogProbFunction.apply(h, w, None, c.index, 1.0, TRL_VOCAB_CHUNK, None, 1.0, ())
        return -out[0].mean()
    return run


def liger_row():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except Exception as exc:  # noqa: BLE001
        raise Unavailable(f"liger-kernel: {type(exc).__name__}: {exc}") from exc
    fn = LigerFusedLinearGRPOLoss(beta=LOSS["beta"], compiled=False, use_ref_model=True,
                                  epsilon_low=LOSS["epsilon_low"], epsilon_high=LOSS["epsilon_high"],
                                  loss_type=LOSS["loss_type"], temperature=1.0)

    def run(h, w, c):
        out = fn(h.view(c.B, c.C, -1), w, c.ids(), c.mask.long(), c.adv, ref_per_token_logps=c.ref,
                 old_per_token_logps=c.old)
        return out[0] if isinstance(out, tuple) else out
    return run


ROWS: list[tuple[str, Callable[[], Callable]]] = [
    ("ours: fused_linear_grpo_loss (default: one pass)", lambda: ours_grpo()),
    ("ours: fused_linear_grpo_loss, two sweeps, 64 MiB", lambda: ours_grpo(workspace_bytes=64 << 20)),
    ("ours: fused_linear_grpo_loss, two sweeps, 1 GiB (15 tiles kept)",
     lambda: ours_grpo(vocab_tile=4096, workspace_bytes=1 << 30)),
    ("ours: fused_linear_grpo_loss, one pass, chunks of 2048", lambda: ours_grpo(vocab_tile=VOCAB, chunk_tokens=2048)),
    ("ours: fused_linear_grpo_loss, one pass, all N tokens", lambda: ours_grpo(vocab_tile=VOCAB, chunk_tokens=1 << 30)),
    ("ours: fused_linear_grpo_loss, GSPO (sequence IS)", lambda: ours_grpo(importance_sampling_level="sequence")),
    ("ours: fused_linear_logprobs, -mean", lambda: ours_logprobs),
    ("plain: bf16 logits + fp32 CE", lambda: plain_ce_fp32),
    ("plain: bf16 logits + bf16 CE", lambda: plain_ce_bf16),
    ("plain: bf16 logits + grpo_loss_from_logits", lambda: plain_grpo_from_logits),
    ("Apple CCE 25.1.1 linear_cross_entropy", cce_row),
    ("TRL 1.16 ChunkedLogProbFunction", trl_row),
    ("Liger 0.8.5 LigerFusedLinearGRPOLoss", liger_row),
]
OURS = ROWS[0][0]
PLAIN_BF16 = "plain: bf16 logits + bf16 CE"
CCE, TRL, LIGER = (next(name for name, _ in ROWS if name.startswith(p)) for p in ("Apple", "TRL", "Liger"))


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------

def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, case: Case, device, warmup: int, reps: int):
    """(median ms, peak extra bytes or None, loss, (d(hidden), d(weight))) of forward + backward."""
    import torch

    h = case.hidden.detach().requires_grad_()
    w = case.weight.detach().requires_grad_()

    def step():
        h.grad = w.grad = None
        loss = fn(h, w, case)
        loss.backward()
        return loss

    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(reps):
        h.grad = w.grad = None  # freed before timing: each rep allocates its own gradients
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    h.grad = w.grad = None
    gc.collect()
    peak = None
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        loss = step()
    return statistics.median(times), peak, loss.detach().float(), (h.grad, w.grad)


def reference_grpo(case: Case):
    """Loss, d(hidden) and d(weight) of the plain path: bf16 logits, fp32 log-probs, the reference loss."""
    from atlas_kernels import reference

    h = case.hidden.detach().requires_grad_()
    w = case.weight.detach().requires_grad_()
    loss, _ = reference.fused_linear_grpo_loss(h.view(case.B, case.C, -1), w, case.ids(), case.old,
                                               case.ref, case.adv, case.mask, validate=False, **LOSS)
    loss.backward()
    return loss.detach().float(), (h.grad, w.grad)


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def run_case(case: Case, device, warmup: int, reps: int, names: set[str] | None) -> list[Row]:
    import torch
    import torch.nn.functional as F

    rows = []
    ref_loss = ref_grad = None
    ours_lp = None
    for name, factory in ROWS:
        if names and name not in names:
            continue
        row = Row(name)
        rows.append(row)
        try:
            fn = factory()
            slow = name == LIGER
            row.ms, row.peak, loss, (grad_h, grad_w) = measure(fn, case, device, 1 if slow else warmup, 2 if slow else reps)
            if name.startswith("ours: fused_linear_grpo") or name == LIGER or name.endswith("grpo_loss_from_logits"):
                if "GSPO" in name:
                    row.check = "-"
                else:
                    if ref_loss is None:
                        ref_loss, ref_grad = reference_grpo(case)
                    row.check = (f"loss rel {rel(loss, ref_loss):.1e}, d(hidden) rel {rel(grad_h, ref_grad[0]):.1e}, "
                                 f"d(weight) rel {rel(grad_w, ref_grad[1]):.1e}")
            elif "CE" in name or name == CCE:
                with torch.no_grad():
                    ce = F.cross_entropy((case.hidden @ case.weight.t()).float(), case.index)
                row.check = f"loss rel {rel(loss, ce):.1e} vs fp32 CE"
            elif name == TRL or name.startswith("ours: fused_linear_logprobs"):
                from atlas_kernels import fused_linear_logprobs

                if ours_lp is None:
                    with torch.no_grad():
                        ours_lp = fused_linear_logprobs(case.hidden, case.weight, case.index)
                row.check = f"-mean logp rel {rel(loss, -ours_lp.mean()):.1e} vs ours"
            del loss, grad_h, grad_w
        except Unavailable as exc:
            row.note = f"n/a ({exc})"
        except Exception as exc:  # noqa: BLE001 - one broken row must not end the run
            row.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:150]}"
            traceback.print_exc()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # each row's peak starts from the same pool state
        print(f"  H={case.H:5d} {name:55s} {fmt_ms(row):>10s} {fmt_mem(row):>10s}  {row.check}{row.note}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def fmt_ms(row: Row) -> str:
    return "n/a" if row.ms is None else f"{row.ms:.2f} ms"


def fmt_mem(row: Row) -> str:
    return "n/a" if row.peak is None else f"{row.peak / 2**30:.2f} GiB"


def tflops(row: Row, n: int, H: int, V: int) -> str:
    return "" if row.ms is None else f"{6 * n * H * V / (row.ms * 1e-3) / 1e12:.0f}"


def report(results: dict[int, list[Row]], n: int, V: int, header: list[str]) -> str:
    lines = [MARK_START, "## Fused linear log-probs and GRPO loss (`bench_fused_linear.py`)", ""]
    lines += header + [""]
    lines += ["| H | row | ms | TFLOP/s (6NHV) | peak extra | check |", "|---|---|---|---|---|---|"]
    for H, rows in results.items():
        for r in rows:
            lines.append(f"| {H} | {r.name} | {fmt_ms(r) if not r.note else r.note} | {tflops(r, n, H, V)} | "
                         f"{fmt_mem(r)} | {r.check} |")
    lines += ["", "Targets (ours = `fused_linear_grpo_loss`, default plan):", "",
              "| H | ours ms | vs CCE (< 1) | vs TRL chunked (< 1) | vs plain bf16 CE | memory vs CCE (<= 1) | memory vs TRL | Liger / ours (>= 5) |",
              "|---|---|---|---|---|---|---|---|"]
    for H, rows in results.items():
        by = {r.name: r for r in rows}
        ours = by.get(OURS)
        if ours is None or ours.ms is None:
            continue

        def ratio(name, attr="ms", inverse=False):
            other = by.get(name)
            if other is None or getattr(other, attr) is None:
                return "n/a"
            a, b = getattr(ours, attr), getattr(other, attr)
            return f"{(b / a) if inverse else (a / b):.2f}"
        plain = ratio(PLAIN_BF16)
        if H == 3584 and plain != "n/a":
            plain += f" (target <= {TARGET_PLAIN_RATIO})"
        lines.append(f"| {H} | {ours.ms:.2f} | {ratio(CCE)} | {ratio(TRL)} | {plain} | {ratio(CCE, 'peak')} | "
                     f"{ratio(TRL, 'peak')} | {ratio(LIGER, inverse=True)} |")
    lines.append(MARK_END)
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        _, tail = rest.split(MARK_END, 1)
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    path.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (about 3 minutes)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the harness only")
    ap.add_argument("--hidden", type=int, nargs="*", default=None, help="hidden sizes (default 896 1536 3584)")
    ap.add_argument("--rows", nargs="*", default=None, help="only rows whose name contains one of these")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown file to update (its section only)")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch

    if args.cpu_smoke:
        device, n, V, hiddens = torch.device("cpu"), 64, 1000, args.hidden or [32]
        warmup, reps = 0, 1
    else:
        if not torch.cuda.is_available():
            print("needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
            return 2
        device, n, V, hiddens = torch.device("cuda"), N_TOKENS, VOCAB, args.hidden or list(HIDDENS)
        warmup, reps = (1, 3) if args.quick else (3, 10)
    names = None
    if args.rows:
        names = {name for name, _ in ROWS if any(s in name for s in args.rows)} | {OURS}
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    header = [
        f"Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC on {gpu}; torch {torch.__version__}, "
        f"triton {_version('triton')}, trl {_version('trl')}, liger-kernel {_version('liger-kernel')}, "
        f"cut-cross-entropy {_version('cut-cross-entropy')}; commit {os.environ.get('ATLAS_FAST_COMMIT', 'unknown')}.",
        f"N = {n} tokens ({SEQS} x {n // SEQS}), V = {V}, bf16, logits std ~{LOGIT_STD}; GRPO: {LOSS}, old and "
        f"reference log-probs, no padding; median of {reps} after {warmup} warm-up"
        + (" (CPU smoke run: numbers mean nothing)" if args.cpu_smoke else "") + ".",
        "Peak extra = max allocated during one forward+backward minus allocated before it (the d(hidden) and "
        "d(weight) every row returns included: d(weight) alone is V*H*2 bytes, 0.25 GiB at H = 896, 1.01 GiB at 3584).",
    ]
    print("\n".join(header), flush=True)
    results = {}
    for H in hiddens:
        case = make_case(H, n, V, device)
        results[H] = run_case(case, device, warmup, reps, names)
        del case
        gc.collect()
    section = report(results, n, V, header)
    print(section)
    if not args.cpu_smoke or args.out != DEFAULT_OUT:
        write_section(args.out, section)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
