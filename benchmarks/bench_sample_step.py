#!/usr/bin/env python
"""The engine's per-step work after the CUDA-graph replay, with the fused bookkeeping (the one-pass
sampler's pick kernel records the draw and writes the next graph inputs) against the unfused
sequence (the same sampler, then ~7 PyTorch ops and two input copies before the next replay).

1. Step loop at batch 64, vocabulary 151936, bf16 logits: a captured stand-in step (a sleep kernel
   of about one Qwen2.5-0.5B decode step, then a gather of logits rows chosen by the input tokens),
   then `EngineBackend._sample_into` exactly as the engine calls it. Per step: GPU time added over
   the replay alone (CUDA events over 300 steps, kernel gaps included), host time of the post-replay
   calls, kernels launched per step (torch.profiler), and whether both write identical outputs.
2. The engine A/B: generate() on the Qwen2.5-0.5B shape (random weights, bf16), 8 prompts x 8
   samples, 512 new tokens, temperature 1, with EOS ignored (no stop mask) and with stops live;
   ms per decode step = (whole call - prefill-only call) / (new tokens - 1).

    source benchmarks/gpu_env.sh && python benchmarks/bench_sample_step.py     # ~2 min on an H200
    python benchmarks/bench_sample_step.py --device cpu                        # harness smoke (interpreter)
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1:][:1] == ["cpu"]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit is defined

import results_md  # noqa: E402
from shapes import QWEN_05B, Shape  # noqa: E402

DEFAULT_OUT = HERE / "RESULTS.md"
SLEEP_CYCLES = 2_000_000  # ~1 ms at the H200's ~1.98 GHz SM clock: about one 0.5B decode step at batch 64


def stand_in_graphs(base: torch.Tensor, B: int, device: str, sleep: bool):
    """DecodeGraphs over a step that sleeps (the forward) and gathers logits rows picked by the tokens."""
    from atlas_fast.rollout.engine.graphs import DecodeGraphs

    def step(tokens, positions, span):
        if sleep:
            torch.cuda._sleep(SLEEP_CYCLES)
        return base[(tokens + positions) % base.shape[0]]

    return DecodeGraphs(step, B, torch.device(device)) if device == "cuda" else None, step


def run_loop(fused: bool, B: int, V: int, T: int, steps: int, device: str, with_stop: bool, profile: bool = False):
    """`steps` decode steps of the stand-in -> (out_tokens, out_logps, finished, positions, gpu ms
    per step, host us per step of the post-replay calls, kernels per whole step or None)."""
    from atlas_fast.rollout import SamplingParams
    from atlas_fast.rollout.engine import EngineBackend
    from atlas_fast.rollout.engine.batch import new_batch

    g = torch.Generator().manual_seed(0)
    base = (3 * torch.randn(B, V, generator=g)).to(torch.bfloat16).to(device)
    graphs, step = stand_in_graphs(base, B, device, sleep=device == "cuda")
    engine = SimpleNamespace(fused_bookkeeping=fused, pad_id=0, graphs=graphs)
    N = B - 3  # three padding slots
    batch = new_batch([17] * N, 1, torch.zeros(N, dtype=torch.long, device=device), B, None, 0)
    batch = EngineBackend._graph_inputs(engine, batch)
    stop_mask = None
    if with_stop:
        stop_mask = torch.zeros(V, dtype=torch.bool, device=device)
        stop_mask[torch.randint(2, V, (V // 2000,), generator=g).to(device)] = True  # ~0.05 %: a few rows stop
    sampling = SamplingParams(max_tokens=T, temperature=1.0, logprobs=True)
    out_tokens = torch.zeros((N + 1, T), dtype=torch.long, device=device)
    out_logps = torch.zeros((N + 1, T), dtype=torch.float32, device=device)
    seeds = 12345

    def decode(t):
        return graphs(batch.tokens, batch.positions, 0) if graphs is not None else step(batch.tokens, batch.positions, 0)

    def post(logits, t):
        EngineBackend._sample_into(engine, batch, logits, t, sampling, stop_mask, None, out_tokens, out_logps, seeds,
                                   advance=1)

    post(base, 0)
    decode(1)  # captures the graph
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    host, kernels = [], None
    start = torch.cuda.Event(enable_timing=True) if device == "cuda" else None
    end = torch.cuda.Event(enable_timing=True) if device == "cuda" else None
    if start is not None:
        start.record()
    for t in range(1, steps + 1):
        logits = decode(t)
        h0 = time.perf_counter()
        post(logits, t % T)
        host.append(time.perf_counter() - h0)
    gpu_ms = float("nan")
    if end is not None:
        end.record()
        end.synchronize()
        gpu_ms = start.elapsed_time(end) / steps
    result = (out_tokens.clone(), out_logps.clone(), batch.finished.clone(), batch.positions.clone())
    if profile and device == "cuda":  # whole steps: the stand-in's own two kernels included
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for t in range(1, 6):
                post(decode(t), t)
            sync()
        kernels = sum(1 for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA) / 5
    return (*result, gpu_ms, 1e6 * statistics.median(host), kernels)


def replay_only_ms(B: int, V: int, steps: int) -> float:
    g = torch.Generator().manual_seed(0)
    base = (3 * torch.randn(B, V, generator=g)).to(torch.bfloat16).cuda()
    graphs, _ = stand_in_graphs(base, B, "cuda", sleep=True)
    tokens, positions, _, _ = graphs.adopt(torch.zeros(B, dtype=torch.long).cuda(), torch.zeros(B, dtype=torch.long).cuda(),
                                           torch.zeros(B, dtype=torch.bool).cuda(), torch.arange(B).cuda())
    graphs(tokens, positions, 0)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        graphs(tokens, positions, 0)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def step_table(device: str, B: int, V: int, steps: int) -> tuple[list[str], list[str]]:
    T = steps + 1
    lines = ["| stop mask | bookkeeping | GPU us/step over the replay | host us/step (post-replay calls) | "
             "kernels/step (stand-in replay's 2 included) | same outputs |", "|---|---|---|---|---|---|"]
    notes = []
    replay = replay_only_ms(B, V, steps) if device == "cuda" else float("nan")
    notes.append(f"stand-in replay alone: {replay * 1e3:.1f} us/step (sleep + logits gather)")
    for with_stop in (False, True):
        res = {}
        for fused in (False, True):
            run_loop(fused, B, V, T, 3, device, with_stop)  # warm-up: compiles the kernels
            res[fused] = run_loop(fused, B, V, T, steps, device, with_stop, profile=True)
        same = all(torch.equal(a, b) for a, b in zip(res[True][:4], res[False][:4]))
        for fused in (False, True):
            *_, gpu_ms, host_us, kernels = res[fused]
            extra = (gpu_ms - replay) * 1e3
            lines.append(f"| {'yes' if with_stop else 'no'} | {'fused' if fused else 'PyTorch'} | {extra:.1f} | "
                         f"{host_us:.1f} | {'n/a' if kernels is None else f'{kernels:g}'} | {'yes' if same else 'NO'} |")
        print("\n".join(lines[-2:]), flush=True)
    return lines, notes


def engine_table(device: str, shape: Shape, new_tokens: int, prompt_lens: tuple[int, int], repeats: int) -> list[str]:
    from bench_generation import EOS_ID, PAD_ID, SAMPLES, build_model, make_prompts, timed

    from atlas_fast.rollout import SamplingParams
    from atlas_fast.rollout.engine import EngineBackend

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_model(shape, device, dtype)
    prompts = make_prompts(shape.vocab, prompt_lens)
    tokenizer = SimpleNamespace(pad_token_id=PAD_ID, eos_token_id=EOS_ID)
    lines = [f"Engine, {shape.name}, {len(prompts)} prompts x {SAMPLES} samples, {new_tokens} new tokens, T = 1:", "",
             "| stops | bookkeeping | ms/decode step | whole call s | same completions |", "|---|---|---|---|---|"]
    for ignore_eos in (True, False):
        engines = {fused: EngineBackend(model, tokenizer, max_rows=len(prompts) * SAMPLES,
                                        max_length=max(map(len, prompts)) + new_tokens, fused_sampler=True,
                                        fused_bookkeeping=fused) for fused in (False, True)}
        full = SamplingParams(max_tokens=new_tokens, n=SAMPLES, temperature=1.0, ignore_eos=ignore_eos, seed=0)
        first = SamplingParams(max_tokens=1, n=SAMPLES, temperature=1.0, ignore_eos=ignore_eos, seed=0)
        outs = {fused: e.generate(prompts, full) for fused, e in engines.items()}  # captures the graphs
        same = outs[True].completion_ids == outs[False].completion_ids
        totals, prefills = {False: [], True: []}, {False: [], True: []}
        for _ in range(repeats):  # interleaved, so clock drift hits both alike
            for fused, e in engines.items():
                totals[fused].append(timed(lambda: e.generate(prompts, full), device))
                prefills[fused].append(timed(lambda: e.generate(prompts, first), device))
        for fused in (False, True):
            total, prefill = statistics.median(totals[fused]), statistics.median(prefills[fused])
            steps = outs[fused].metrics["engine/decode_steps"]
            step_ms = 1e3 * (total - prefill) / max(steps - 1, 1)
            lines.append(f"| {'EOS ignored' if ignore_eos else 'EOS live'} | {'fused' if fused else 'PyTorch'} | "
                         f"{step_ms:.3f} | {total:.3f} | {'yes' if same else 'NO'} |")
            print(lines[-1], flush=True)
        for e in engines.values():
            e.close()
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="markdown file to update (default: benchmarks/RESULTS.md on CUDA)")
    ap.add_argument("--no-engine", action="store_true", help="the step loop only")
    args = ap.parse_args(argv)
    device = args.device
    if device == "cuda":
        B, V, steps, shape, new_tokens, prompt_lens, repeats = 64, QWEN_05B.vocab, 300, QWEN_05B, 512, (30, 256), 3
    else:
        B, V, steps, shape, new_tokens, prompt_lens, repeats = 8, 97, 4, Shape("tiny (CPU smoke)", 64, 1, 4, 2, 128, 97), 4, (3, 6), 1
    print(f"step loop: batch {B}, vocabulary {V}, {steps} steps on {device}", flush=True)
    lines, notes = step_table(device, B, V, steps)
    body = [f"## Per-step work after the decode graph replay (`bench_sample_step.py`, "
            f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
            f"Device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (interpreter smoke)'}; torch "
            f"{torch.__version__}. Step loop at batch {B} (3 padding slots), vocabulary {V}, bf16 logits, "
            f"{steps} steps; {notes[0]}.", "", *lines, ""]
    if not args.no_engine:
        body += engine_table(device, shape, new_tokens, prompt_lens, repeats)
    text = "\n".join(body)
    print(text)
    out = args.out if args.out is not None else (DEFAULT_OUT if device == "cuda" else None)
    if out is not None:
        results_md.write_section(out, "sample_step", text)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
