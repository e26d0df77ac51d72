#!/usr/bin/env python
"""Time the engine's Triton decode attention (atlas_fast/rollout/engine/decode_kernel.py) per call,
for each merge variant and launch setting, as the decode step runs it.

Workload: batch 64, bf16, positions uniform in [31, S) (seed 0: prompts of 30-256 tokens part-way
through their completions), one KV cache per layer ([layers, 2, rows, Hkv, S, D], the engine's
layout) so that, as in a real step, consecutive calls do not find the previous call's KV in L2.
  * Qwen2.5-0.5B-like: 14 query heads, 2 KV heads, head_dim 64, S=768 (256 prompt + 512 new);
  * Qwen2.5-1.5B-like: 12 query heads, 2 KV heads, head_dim 128, S=1280 (256 + 1024).

Each setting is captured in one CUDA graph of `layers` back-to-back calls (24: the decode step's
attention calls), after an eager warm-up call per layer (compilation, ticket counters); the graph
is replayed 20 times, each timed with CUDA events; a call's time is the median replay / layers.
Floor: the KV bytes the calls must read (keys and values 0..pos of every row) / 4.2e12 B/s.
After timing, the outputs of the first and last layer's calls of the last replay are checked
against a float64 reference (so a stale ticket counter between replays shows as an error).

    python benchmarks/bench_decode_attention.py [--quick] [--shapes 0.5b,1.5b,0.5b-1k] [--out FILE]
    python benchmarks/bench_decode_attention.py --list          # print the settings, run nothing
    python benchmarks/bench_decode_attention.py --device cpu    # smoke run through the Triton interpreter

At most 24 settings per shape (compilation included, about a minute per shape on an H200).
The table is printed and, on CUDA, written between this script's markers in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import results_md  # noqa: E402  (benchmarks/ is on sys.path)

DEFAULT_OUT = HERE / "RESULTS.md"
SECTION = "bench_decode_attention"
HBM_BYTES_PER_S = 4.2e12  # H200's sustained HBM3e read rate: the floor's denominator
BATCH = 64
REPLAYS = 20
SEED = 0


@dataclass(frozen=True)
class AttnShape:
    name: str
    q_heads: int
    kv_heads: int
    head_dim: int
    length: int  # S: the cache's static length
    layers: int = 24
    batch: int = BATCH
    first_pos: int = 31  # positions uniform in [first_pos, length)


SHAPES = {
    "0.5b": AttnShape("Qwen2.5-0.5B-like", 14, 2, 64, 768),
    "1.5b": AttnShape("Qwen2.5-1.5B-like", 12, 2, 128, 1280),
    "0.5b-1k": AttnShape("Qwen2.5-0.5B-like, 1024 new", 14, 2, 64, 1280),
}
CPU_SHAPE = AttnShape("tiny (CPU smoke)", 6, 2, 16, 100, layers=2, batch=3, first_pos=1)  # 1-4 splits


@dataclass(frozen=True)
class Setting:
    variant: str
    block_n: int
    num_warps: int
    num_stages: int
    programs_per_sm: int


def settings(quick: bool = False) -> list[Setting]:
    """The sweep: per variant, the defaults (64 keys, 4 warps, 3 stages, 2 programs/SM) with the
    grid target at 1/2/4 programs per SM; whole 256-key splits in one or two loads (fewer round
    trips to memory per program); smaller and larger key blocks with matching warp counts; fewer
    warps; deeper pipelining. 12 per variant."""
    per_variant = [(64, 4, 3, 2), (64, 4, 3, 1), (64, 4, 3, 4),
                   (256, 4, 1, 2), (256, 8, 1, 2), (128, 4, 2, 2), (128, 4, 3, 1),
                   (32, 2, 3, 4), (64, 2, 3, 2), (64, 2, 3, 4), (64, 4, 4, 2), (32, 4, 4, 2)]
    if quick:
        per_variant = [(64, 4, 3, 2), (64, 4, 3, 4), (32, 2, 3, 4)]
    return [Setting(v, *knobs) for v in ("two_kernel", "one_launch") for knobs in per_variant]


@dataclass
class Row:
    shape: str
    variant: str
    block_n: int
    num_warps: int
    num_stages: int
    programs_per_sm: int
    splits: int
    us_per_call: float
    floor_us: float
    max_err: float
    error: str = ""


def make_inputs(shape: AttnShape, device: torch.device, dtype: torch.dtype):
    g = torch.Generator().manual_seed(SEED)
    B, L = shape.batch, shape.layers
    positions = torch.randint(shape.first_pos, shape.length, (B,), generator=g)
    q = torch.randn(L, B, shape.q_heads, shape.head_dim, generator=g).to(dtype)
    kv = torch.empty(L, 2, B, shape.kv_heads, shape.length, shape.head_dim, dtype=dtype, device=device)
    gd = torch.Generator(device=device).manual_seed(SEED)
    for layer in range(L):  # one layer at a time: the 1.5B shape's cache is 2 GB in bf16
        kv[layer].copy_(torch.randn(kv.shape[1:], generator=gd, device=device))
    return q.to(device), kv, positions.to(device)


def kv_floor_us(shape: AttnShape, positions: torch.Tensor, dtype: torch.dtype) -> float:
    """Per call: keys and values 0..pos[b] of every row and KV head, at HBM_BYTES_PER_S."""
    elems = int((positions + 1).sum()) * shape.kv_heads * shape.head_dim * 2
    return elems * torch.finfo(dtype).bits / 8 / HBM_BYTES_PER_S * 1e6


def reference(q, k, v, positions, scale) -> torch.Tensor:
    """float64 attention of q [B, Hq, D] over keys 0..pos[b] of k/v [B, Hkv, S, D] -> [B, Hq*D]."""
    B, HQ, D = q.shape
    HKV, S = k.shape[1], k.shape[2]
    qg = q.double().view(B, HKV, HQ // HKV, D)
    scores = torch.einsum("bhgd,bhsd->bhgs", qg, k.double()) * scale
    visible = torch.arange(S, device=q.device)[None, :] <= positions[:, None]  # [B, S]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    return torch.einsum("bhgs,bhsd->bhgd", scores.softmax(-1), v.double()).reshape(B, HQ * D)


def run_setting(shape: AttnShape, s: Setting, q, kv, positions, device: torch.device, replays: int) -> Row:
    from atlas_fast.rollout.engine import decode_kernel

    scale = shape.head_dim ** -0.5
    splits, _ = decode_kernel._splits(shape.batch, shape.kv_heads, shape.length, device, s.block_n, s.programs_per_sm)
    floor = kv_floor_us(shape, positions, q.dtype)
    row = Row(shape.name, s.variant, s.block_n, s.num_warps, s.num_stages, s.programs_per_sm, splits,
              float("nan"), floor, float("nan"))
    knobs = dict(variant=s.variant, block_n=s.block_n, num_warps=s.num_warps, num_stages=s.num_stages,
                 programs_per_sm=s.programs_per_sm)

    def step() -> list[torch.Tensor]:
        return [decode_kernel.decode_attention_triton(q[i], kv[i, 0], kv[i, 1], positions, scale, None, **knobs)
                for i in range(shape.layers)]

    try:
        if device.type == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()  # compiles, allocates the ticket counters outside capture
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs = step()
            graph.replay()  # first replay: uploads the graph
            times = []
            for _ in range(replays):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3)  # us
            torch.cuda.synchronize()
        else:
            times = []
            for _ in range(replays):
                t0 = time.perf_counter()
                outs = step()
                times.append((time.perf_counter() - t0) * 1e6)
        row.us_per_call = statistics.median(times) / shape.layers
        errs = []
        for i in sorted({0, shape.layers - 1}):
            ref = reference(q[i], kv[i, 0, :shape.batch], kv[i, 1, :shape.batch], positions, scale)
            errs.append((outs[i].double() - ref).abs().max().item())
        row.max_err = max(errs)
        if not all(torch.isfinite(o).all() for o in outs):
            row.error = "non-finite output"
        if s.variant == "one_launch":
            tickets = decode_kernel.tickets_for(device, shape.batch, shape.kv_heads)
            if (tickets != 0).any():
                row.error = (row.error + "; " if row.error else "") + "ticket counters not back at zero"
        if device.type == "cuda":
            del graph, outs
            torch.cuda.empty_cache()
    except Exception as e:  # a setting that fails to compile or launch is reported, the sweep goes on
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return row


def table(rows: list[Row]) -> str:
    head = ("| shape | variant | block_n | warps | stages | programs/SM | splits | us/call | KV floor us "
            "| x floor | max err | note |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r.shape} | {r.variant} | {r.block_n} | {r.num_warps} | {r.num_stages} | "
                     f"{r.programs_per_sm} | {r.splits} | {r.us_per_call:.2f} | {r.floor_us:.2f} | "
                     f"{r.us_per_call / r.floor_us:.2f} | {r.max_err:.1e} | {r.error} |")
    return "\n".join(lines)


def run(device: str = "cuda", shapes: tuple[str, ...] = ("0.5b", "1.5b"), quick: bool = False,
        out: Path | None = None, replays: int = REPLAYS) -> list[Row]:
    """Time every setting on every shape; print the table (and write it to `out`); return the rows."""
    dev = torch.device(device)
    dtype = torch.bfloat16
    began = time.perf_counter()
    rows: list[Row] = []
    todo = [CPU_SHAPE] if dev.type == "cpu" else [SHAPES[name] for name in shapes]
    sweep = settings(quick or dev.type == "cpu")
    for shape in todo:
        q, kv, positions = make_inputs(shape, dev, dtype)
        for s in sweep:
            row = run_setting(shape, s, q, kv, positions, dev, replays if dev.type == "cuda" else 2)
            rows.append(row)
            print(f"{shape.name:>20} {s.variant:>10} block {s.block_n:>3} warps {s.num_warps} stages "
                  f"{s.num_stages} ppsm {s.programs_per_sm} splits {row.splits:>2}: {row.us_per_call:8.2f} us "
                  f"(floor {row.floor_us:.2f}, err {row.max_err:.1e}) {row.error}", flush=True)
        del q, kv
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    text = table(rows)
    print(text)
    print(f"{len(rows)} settings in {time.perf_counter() - began:.0f} s (Triton compilation included)")
    if out is not None:
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter: times mean nothing)"
        body = (f"## Decode attention per call (bench_decode_attention.py)\n\n"
                f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {name}, torch {torch.__version__}, "
                f"commit {os.environ.get('ATLAS_FAST_COMMIT', 'unknown')}. Batch {BATCH}, bf16, positions "
                f"uniform in [31, S) (seed {SEED}); one CUDA graph of 24 calls on 24 layers' caches, median of "
                f"{replays} replays / 24. KV floor: bytes of keys/values 0..pos read / {HBM_BYTES_PER_S:.1e} B/s. "
                f"max err: against float64, first and last layer of the last replay.\n\n{text}\n")
        results_md.write_section(out, SECTION, body)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default="0.5b,1.5b", help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--quick", action="store_true", help="3 settings per variant")
    ap.add_argument("--replays", type=int, default=REPLAYS)
    ap.add_argument("--out", type=Path, default=None, help="markdown file to update (default on CUDA: benchmarks/RESULTS.md)")
    ap.add_argument("--list", action="store_true", help="print the settings and exit")
    args = ap.parse_args()
    if args.list:
        for s in settings(args.quick):
            print(asdict(s))
        return
    shapes = tuple(x.strip() for x in args.shapes.split(",") if x.strip())
    unknown = [x for x in shapes if x not in SHAPES]
    if unknown:
        ap.error(f"unknown shapes {unknown}; choose from {list(SHAPES)}")
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined: before their import
    out = args.out if args.out is not None else (DEFAULT_OUT if args.device.startswith("cuda") else None)
    run(args.device, shapes, args.quick, out, args.replays)


if __name__ == "__main__":
    main()
