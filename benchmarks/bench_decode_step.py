#!/usr/bin/env python
"""The decode step's projections at batch 64: cuBLAS (+ the separate rotary/KV-write or SiLU-mul
kernel) against the fused skinny GEMMs of `atlas_fast/rollout/engine/skinny.py`, per launch setting.

Each op runs once per layer with that layer's own weights (so weights come from HBM, as in a
decode step, not from L2), all layers captured in one CUDA graph; the time is a replay's median
over 30 replays divided by the layer count. Floor = the op's weight bytes / the measured copy rate.
Prints a table per shape and the best setting per op (the defaults in skinny.py come from it); on
CUDA the best-per-op table goes into its section of benchmarks/RESULTS.md (--out).

    source benchmarks/gpu_env.sh && python benchmarks/bench_decode_step.py          # ~2 min on an H200
    python benchmarks/bench_decode_step.py --device cpu                               # harness smoke (interpreter)
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_md  # noqa: E402  (benchmarks/ is on sys.path)
from bench_generation import copy_rate  # noqa: E402

SECTION = "decode_step_ops"
DEFAULT_OUT = Path(__file__).resolve().parent / "RESULTS.md"


@dataclass
class Dims:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    layers: int
    cache: int  # positions per cache row


SHAPES = [Dims("Qwen2.5-0.5B", 896, 14, 2, 64, 4864, 24, 768), Dims("Qwen2.5-1.5B", 1536, 12, 2, 128, 8960, 28, 1280)]
TINY = Dims("tiny", 64, 4, 2, 32, 96, 2, 64)


def time_layers(fn, layers: int, device: str) -> float:
    """Microseconds per call of fn(i) for i over the layers, replayed from one CUDA graph."""
    if device != "cuda":
        for i in range(layers):
            fn(i)
        return float("nan")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(layers):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(layers):
            fn(i)
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / layers)
    return statistics.median(times)


def run_shape(d: Dims, M: int, device: str, dtype: torch.dtype, rate: float, configs: dict) -> list[tuple]:
    from atlas_fast.rollout.engine.attention import RopeTable
    from atlas_fast.rollout.engine.kernels import add_rms_norm, rope_store, silu_mul
    from atlas_fast.rollout.engine.skinny import gate_up_silu, linear, qkv_rope_store

    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=0.02):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    H, D, HQ, HKV, I, L = d.hidden, d.head_dim, d.heads, d.kv_heads, d.inter, d.layers
    NQKV = (HQ + 2 * HKV) * D
    w_qkv = [rnd(NQKV, H) for _ in range(L)]
    b_qkv = [rnd(NQKV) for _ in range(L)]
    w_o = [rnd(H, HQ * D) for _ in range(L)]
    w_gu = [rnd(2 * I, H) for _ in range(L)]
    w_d = [rnd(H, I) for _ in range(L)]
    x = rnd(M, H, scale=1.0)
    o_in = rnd(M, HQ * D, scale=1.0)
    act = rnd(M, I, scale=1.0)
    positions = torch.randint(0, d.cache, (M,), generator=g).to(device)
    freqs = torch.arange(d.cache)[:, None] * (1.0 / 10000 ** (torch.arange(0, D, 2) / D))[None]
    emb = torch.cat([freqs, freqs], -1)
    rope = RopeTable.build(emb.cos().to(device, dtype), emb.sin().to(device, dtype))
    kc = torch.zeros(M, HKV, d.cache, D, device=device, dtype=dtype)
    vc = torch.zeros_like(kc)
    el = torch.finfo(dtype).bits // 8
    rows = []

    def add(op, impl, fn, nbytes):
        try:
            us = time_layers(fn, L, device)
        except Exception as err:  # a setting that needs more shared memory than the card has
            print(f"  skip {d.name} {op} {impl}: {type(err).__name__}")
            return
        floor = nbytes / rate * 1e6
        rows.append((d.name, op, impl, us, floor))

    qkv_bytes = NQKV * H * el
    add("qkv + rope + KV write", "cuBLAS + rope_store",
        lambda i: rope_store(*F.linear(x, w_qkv[i], b_qkv[i]).split([HQ * D, HKV * D, HKV * D], -1), positions,
                             rope.cos, rope.sin_signed, kc, vc), qkv_bytes)
    for cfg in configs["qkv"]:
        add("qkv + rope + KV write", f"skinny {cfg}",
            lambda i, cfg=cfg: qkv_rope_store(x, w_qkv[i], b_qkv[i], positions, rope.cos, rope.sin_signed, kc, vc, HQ,
                                              config=cfg), qkv_bytes)
    add("o_proj", "cuBLAS", lambda i: F.linear(o_in, w_o[i]), H * HQ * D * el)
    for cfg in configs["linear"]:
        add("o_proj", f"skinny {cfg}", lambda i, cfg=cfg: linear(o_in, w_o[i], config=cfg), H * HQ * D * el)
    add("gate/up + SiLU-mul", "cuBLAS + silu_mul", lambda i: silu_mul(F.linear(x, w_gu[i])), 2 * I * H * el)
    for cfg in configs["gate_up"]:
        add("gate/up + SiLU-mul", f"skinny {cfg}", lambda i, cfg=cfg: gate_up_silu(x, w_gu[i], config=cfg),
            2 * I * H * el)
    add("down_proj", "cuBLAS", lambda i: F.linear(act, w_d[i]), H * I * el)
    for cfg in configs["linear"]:
        add("down_proj", f"skinny {cfg}", lambda i, cfg=cfg: linear(act, w_d[i], config=cfg), H * I * el)
    # The projections that feed the residual stream, with the add + RMSNorm that reads them: split-K
    # partials are summed by that norm, so the split costs no reduction kernel.
    resid = rnd(M, H, scale=1.0)
    norm_w = rnd(H, scale=1.0)
    for op, inp, ws, nbytes in (("o_proj + add_rms_norm", o_in, w_o, H * HQ * D * el),
                                ("down_proj + add_rms_norm", act, w_d, H * I * el)):
        add(op, "cuBLAS + add_rms_norm", lambda i, inp=inp, ws=ws: add_rms_norm(resid, F.linear(inp, ws[i]), norm_w, 1e-6),
            nbytes)
        for cfg, split in configs["split"]:
            add(op, f"skinny {cfg} split {split}",
                lambda i, inp=inp, ws=ws, cfg=cfg, split=split: add_rms_norm(
                    resid, linear(inp, ws[i], config=cfg, split_k=split), norm_w, 1e-6), nbytes)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None, help="markdown file to update (default: RESULTS.md on CUDA)")
    args = ap.parse_args(argv)
    device = args.device
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        shapes, dtype = [TINY], torch.float32
        configs = {"qkv": [(0, 16, 4, 2)], "linear": [(16, 32, 4, 2)], "gate_up": [(16, 32, 4, 2)],
                   "split": [((16, 32, 4, 2), 2)]}
    else:
        shapes, dtype = SHAPES, torch.bfloat16
        configs = {
            "qkv": [(pairs, 128, 4, st, bm) for pairs, st, bm in itertools.product((0, 16), (3, 4), (16, 32, 64))],
            "linear": [(bn, bk, 4, 4, bm) for bn, bk, bm in itertools.product((16, 32), (128, 256), (32, 64))],
            "gate_up": [(bn, 128, 4, st, bm) for bn, st, bm in itertools.product((32, 64), (3, 4), (32, 64))],
            "split": [((16, 128, 4, 4, bm), sp) for sp, bm in itertools.product((2, 4, 8), (32, 64))],
        }
    rate = copy_rate(device)
    if device == "cuda":
        print(f"{torch.cuda.get_device_name()}; copy rate {rate / 1e12:.2f} TB/s; batch {args.rows}; bf16")
    best_lines = ["| shape | op | baseline | us | best skinny setting | us | baseline / best | floor us |",
                  "|---|---|---|---|---|---|---|---|"]
    for d in shapes:
        rows = run_shape(d, args.rows, device, dtype, rate, configs)
        print(f"\n| shape | op | impl | us / call | floor us | x floor |\n|---|---|---|---|---|---|")
        for name, op, impl, us, floor in rows:
            print(f"| {name} | {op} | {impl} | {us:.2f} | {floor:.2f} | {us / floor:.1f} |")
        print("\nbest per op:")
        for op in dict.fromkeys(r[1] for r in rows):
            mine = [r for r in rows if r[1] == op]
            base = mine[0]
            if len(mine) < 2:
                continue
            best = min(mine[1:], key=lambda r: r[3])
            print(f"  {d.name} {op}: {base[2]} {base[3]:.2f} us; best {best[2]} {best[3]:.2f} us "
                  f"({base[3] / best[3]:.2f}x)")
            best_lines.append(f"| {d.name} | {op} | {base[2]} | {base[3]:.2f} | {best[2]} | {best[3]:.2f} | "
                              f"{base[3] / best[3]:.2f}x | {base[4]:.2f} |")
    out = args.out if args.out is not None else (DEFAULT_OUT if device == "cuda" else None)
    if out is not None:
        when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        commit = os.environ.get("ATLAS_FAST_COMMIT", "unknown")
        card = torch.cuda.get_device_name() if device == "cuda" else device
        body = (f"## The decode step's projections, per launch setting (`bench_decode_step.py`)\n\n"
                f"{card}, {when}, commit {commit}, torch {torch.__version__}; batch {args.rows}, bf16, each layer with its own weights, all layers in one CUDA graph; copy rate "
                f"{rate / 1e12:.2f} TB/s (floor = weight bytes / that rate).\n\n" + "\n".join(best_lines))
        results_md.write_section(out, SECTION, body)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
