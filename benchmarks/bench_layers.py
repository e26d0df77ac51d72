#!/usr/bin/env python
"""Time atlas_kernels' rms_norm and silu_mul (forward + backward) against the HF modules they
replace under `fused_layers`, eager and under torch.compile, at the update phase's shapes.

Workload: N = 8 x 1280 tokens (8 generations of a 256-token prompt + 1024-token completion, the
bench_e2e update case), bf16, the Qwen2.5 0.5B / 1.5B / 7B widths (H, I). Per op: the forward, then
the backward of a random upstream gradient, timed together with CUDA events (median of 20 after 3
warm-ups). Floor: bytes the pair must move at the card's copy rate: RMSNorm reads x and writes y,
then reads x and dy and writes dx (5 x N x H x 2 bytes; d(weight) is small); SiLU-mul reads gate and
up and writes y, then reads gate, up and dy and writes d(gate) and d(up) (8 x N x I x 2 bytes).

    source benchmarks/gpu_env.sh && python benchmarks/bench_layers.py [--out benchmarks/RESULTS.md]
    python benchmarks/bench_layers.py --device cpu      # smoke run (interpreter; times mean nothing)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import results_md  # noqa: E402
from bench_generation import copy_rate  # noqa: E402

SECTION = "layers"
WIDTHS = {"Qwen2.5-0.5B": (896, 4864), "Qwen2.5-1.5B": (1536, 8960), "Qwen2.5-7B": (3584, 18944)}
TOKENS = 8 * 1280


def timed_us(fn, device: str, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def fwd_bwd(op, inputs, dy):
    def run():
        for t in inputs:
            t.grad = None
        op(*inputs).backward(dy)
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="markdown file to update (default on CUDA: RESULTS.md)")
    args = ap.parse_args(argv)
    device = args.device
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    import atlas_kernels

    cpu = device == "cpu"
    widths = {"tiny (CPU smoke)": (64, 96)} if cpu else WIDTHS
    N = 16 if cpu else TOKENS
    rate = copy_rate(device)  # nan on the CPU: floors read nan
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for shape, (H, I) in widths.items():
        norm = Qwen2RMSNorm(H, eps=1e-6).to(device, torch.bfloat16)
        x = torch.randn(N, H, device=device, generator=g).to(torch.bfloat16).requires_grad_()
        dy = torch.randn(N, H, device=device, generator=g).to(torch.bfloat16)
        gate = (4 * torch.randn(N, I, device=device, generator=g)).to(torch.bfloat16).requires_grad_()
        up = torch.randn(N, I, device=device, generator=g).to(torch.bfloat16).requires_grad_()
        dz = torch.randn(N, I, device=device, generator=g).to(torch.bfloat16)

        def hf_silu(a, b):
            return torch.nn.functional.silu(a) * b

        cases = [
            ("RMSNorm", 5 * N * H * 2, [
                ("atlas_kernels.rms_norm", lambda t: atlas_kernels.rms_norm(t, norm.weight, norm.variance_epsilon)),
                ("HF Qwen2RMSNorm, eager", norm),
                ("HF Qwen2RMSNorm, torch.compile", None if cpu else torch.compile(norm))], (x,), dy),
            ("SiLU-mul", 8 * N * I * 2, [
                ("atlas_kernels.silu_mul", atlas_kernels.silu_mul),
                ("silu(gate) * up, eager", hf_silu),
                ("silu(gate) * up, torch.compile", None if cpu else torch.compile(hf_silu))], (gate, up), dz),
        ]
        for op_name, nbytes, impls, inputs, grad in cases:
            ours = None
            for impl, fn in impls:
                if fn is None:
                    continue
                try:
                    us = timed_us(fwd_bwd(fn, inputs, grad), device, reps=3 if cpu else 20)
                    note = ""
                except Exception as exc:  # a baseline that fails to compile is reported, the rest still run
                    us, note = float("nan"), f"failed: {type(exc).__name__}"
                ours = us if ours is None else ours
                floor = nbytes / rate * 1e6
                rows.append((shape, op_name, impl, us, floor, us / ours, note))
                print(f"{shape:>16} {op_name:>8} {impl:>34}: {us:9.1f} us (floor {floor:.1f})", flush=True)
    lines = ["| shape (N = %d tokens) | op, forward + backward | implementation | us | floor us | x floor | vs ours |"
             % N, "|---|---|---|---|---|---|---|"]
    for shape, op_name, impl, us, floor, vs, note in rows:
        lines.append(f"| {shape} | {op_name} | {impl} | {us:.1f} | {floor:.1f} | {us / floor:.2f} | "
                     f"{vs:.2f}x {note} |")
    out = args.out if args.out is not None else (None if cpu else HERE / "RESULTS.md")
    results_md.publish(out, SECTION, "Decoder-layer kernels, forward + backward (`bench_layers.py`)",
                       f"bf16; copy rate {rate / 1e12:.2f} TB/s (floor = bytes moved / that rate); 'vs ours' = that "
                       "row's time / atlas_kernels'.", "\n".join(lines), cpu)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
