#!/usr/bin/env python
"""Time generation: our engine against HF `generate` (dynamic cache) and HF `generate` with a
static cache + torch.compile, in one run, on the GRPO rollout workload of issue 7.

Workload: Qwen2.5-0.5B and -1.5B shapes (random weights, bf16), 8 prompts x 8 samples = 64
sequences, prompt lengths uniform in [30, 256] (fixed seed), 512 and 1024 new tokens with EOS
ignored, temperature 1 (no top-k/top-p), so every system does the same work.

Per system: wall time of the whole call (prefill + decode, CUDA-synchronised), completion tokens/s,
ms per decode step = (whole - prefill-only call) / (new tokens - 1), next to its floor: the bytes a
step must read (every weight once + the KV cache at the run's mean context) at the device-to-device
copy rate measured in the same run. A system that fails is reported with its error.

    python benchmarks/bench_generation.py [--quick] [--out benchmarks/RESULTS.md]
    python benchmarks/bench_generation.py --device cpu      # smoke run of the harness, tiny shapes

--quick (about 4 minutes on an H200): 512 new tokens only, the static-compile path on the 0.5B
shape only, fewer repeats. The table is printed and written between the markers below.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.metadata
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_kernels import _git_commit  # noqa: E402
import results_md  # noqa: E402  (benchmarks/ is on sys.path)
from shapes import QWEN_05B, QWEN_15B, Shape  # noqa: E402

DEFAULT_OUT = HERE / "RESULTS.md"
PROMPTS, SAMPLES = 8, 8
PROMPT_LENS = (30, 256)
PAD_ID, EOS_ID = 0, 1


CPU_TINY = Shape("tiny (CPU smoke)", 64, 2, 4, 2, 128, 512)


@dataclass
class Row:
    shape: str
    new_tokens: int
    system: str
    total_s: float | None = None
    prefill_s: float | None = None
    peak_gib: float | None = None
    error: str = ""

    def tokens_per_s(self) -> float | None:
        return PROMPTS * SAMPLES * self.new_tokens / self.total_s if self.total_s else None

    def step_ms(self) -> float | None:
        """Decode-only when a prefill-only call was timed; else the whole call per token (an upper bound)."""
        if self.total_s is None:
            return None
        if self.prefill_s is None or self.new_tokens < 2:
            return 1e3 * self.total_s / self.new_tokens
        return 1e3 * (self.total_s - self.prefill_s) / (self.new_tokens - 1)


# ------------------------------------------------------------------------------------ set-up
def build_model(shape: Shape, device: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, max_position_embeddings=32768, rope_theta=1e6,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
                      bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(dtype).eval()
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    return model


def make_prompts(vocab: int, lens: tuple[int, int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lens[0], lens[1] + 1, (PROMPTS,), generator=g).tolist()
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]  # ids 0/1 are pad/eos


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def copy_rate(device: str) -> float:
    """Device-to-device copy, bytes read + written per second (1 GiB each way)."""
    if device != "cuda":
        return float("nan")
    src = torch.randint(0, 256, (2**30,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    del src, dst
    return 2 * 2**30 / statistics.median(times)


def floor_ms(model, shape: Shape, prompts: list[list[int]], new_tokens: int, rate: float) -> float:
    """Bytes one decode step must read: every weight once, and each sequence's KV cache at the
    run's mean context length (prompt + half the completion)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied embedding counted once
    head_dim = shape.hidden // shape.heads
    kv_per_token = shape.layers * 2 * shape.kv_heads * head_dim * 2  # K and V, bf16
    mean_ctx = sum(len(p) for p in prompts) / len(prompts) + new_tokens / 2
    kv = PROMPTS * SAMPLES * mean_ctx * kv_per_token
    return 1e3 * (weights + kv) / rate


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def reset_peak(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) < 200 else text[:197] + "..."


# ------------------------------------------------------------------------------------ systems
# Each variant runs only if the one before it failed, so a kernel that breaks on a new stack still
# leaves a timed engine row (and the error of the one that broke).
ENGINE_VARIANTS = (("engine (ours)", {}),
                   ("engine, SDPA decode attention", {"attention": "sdpa"}),
                   ("engine, unpacked projections, PyTorch sampler", {"pack_projections": False, "fused_sampler": False}),
                   ("engine, no Triton (eager norms/rope/attention/sampler)", {"fused_kernels": False, "fused_sampler": False}),
                   ("engine, no CUDA graphs, no Triton", {"fused_kernels": False, "fused_sampler": False, "cuda_graphs": False}))
# Also timed for comparison, on the first shape: the SDPA decode attention over a rounded span.
COMPARE_VARIANT = ("engine, SDPA decode attention", {"attention": "sdpa"})


def run_engine(model, prompts, new_tokens: int, device: str, repeats: int, label: str, system: str = "engine (ours)",
               **options) -> Row:
    from atlas_fast.rollout import SamplingParams
    from atlas_fast.rollout.engine import EngineBackend

    row = Row("", new_tokens, system)
    tokenizer = SimpleNamespace(pad_token_id=PAD_ID, eos_token_id=EOS_ID)  # the engine reads only these two ids
    reset_peak(device)
    engine = EngineBackend(model, tokenizer, max_rows=PROMPTS * SAMPLES,
                           max_length=max(map(len, prompts)) + new_tokens, **options)
    full = SamplingParams(max_tokens=new_tokens, n=SAMPLES, temperature=1.0, ignore_eos=True, seed=0)
    first = SamplingParams(max_tokens=1, n=SAMPLES, temperature=1.0, ignore_eos=True, seed=0)
    warm = timed(lambda: engine.generate(prompts, full), device)  # captures the CUDA graphs
    out = engine.generate(prompts, full)
    assert all(len(c) == new_tokens for c in out.completion_ids), "ignore_eos run returned short completions"
    row.prefill_s = statistics.median(timed(lambda: engine.generate(prompts, first), device) for _ in range(3))
    row.total_s = statistics.median(timed(lambda: engine.generate(prompts, full), device) for _ in range(repeats))
    row.peak_gib = peak_gib(device)
    print(f"  [{label}] {system}: first call {warm:.2f} s (graph capture), then {row.total_s:.3f} s; "
          f"{len(engine.graphs or [])} graphs; KV cache {engine.cache.nbytes / 2**30:.2f} GiB; packed projections "
          f"{(engine.packed.nbytes if engine.packed else 0) / 2**30:.2f} GiB; step {engine._step_fn().__name__}", flush=True)
    engine.close()
    return row


def _hf_inputs(prompts, device):
    from atlas_fast.rollout import left_pad

    ids, mask = left_pad(prompts, PAD_ID, device)  # [8, L]; num_return_sequences fans each out to 8
    return ids, mask


def run_hf(model, prompts, new_tokens: int, device: str, repeats: int, static: bool, label: str) -> Row:
    row = Row("", new_tokens, "HF generate, static cache + torch.compile" if static else "HF generate (dynamic cache)")
    ids, mask = _hf_inputs(prompts, device)

    def call(n_new: int):
        kwargs = dict(cache_implementation="static") if static else {}
        # transformers compiles the forward itself (CompileConfig: mode reduce-overhead) when the cache is static.
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=None,
                             top_p=None, max_new_tokens=n_new, min_new_tokens=n_new, num_return_sequences=SAMPLES,
                             pad_token_id=PAD_ID, eos_token_id=None, **kwargs)
        assert out.shape[1] - ids.shape[1] == n_new, f"generated {out.shape[1] - ids.shape[1]} tokens, not {n_new}"

    reset_peak(device)
    try:
        with torch.no_grad():
            torch.manual_seed(0)
            # The static path compiles for its cache size (prompt + new tokens), so it warms up at full length.
            t_warm = timed(lambda: call(new_tokens if static else 4), device)
            if not static:  # a 1-token call would compile a second cache size on the static path
                row.prefill_s = statistics.median(timed(lambda: call(1), device) for _ in range(2))
            row.total_s = statistics.median(timed(lambda: call(new_tokens), device) for _ in range(repeats))
            row.peak_gib = peak_gib(device)
            print(f"  [{label}] {row.system}: first call {t_warm:.1f} s, then {row.total_s:.2f} s", flush=True)
    except Exception as exc:  # a failing baseline is a result, not a crash
        row.error = short(exc)
        print(f"  [{label}] {row.system} FAILED: {row.error}", flush=True)
        traceback.print_exc()
    return row


def diagnose_engine(model, prompts, device: str) -> str:
    """Where an engine step's time goes at batch 64: the graph replay (the forward), the sampler, and
    the kernels of one eager forward (count and GPU time; the graph replays the same kernels)."""
    if device != "cuda":
        return ""
    from torch.profiler import ProfilerActivity, profile

    from atlas_fast.rollout import SamplingParams
    from atlas_fast.rollout.engine import EngineBackend
    from atlas_fast.rollout.engine.sampling import sample

    def per_call_ms(fn, reps=50) -> float:
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps

    tokenizer = SimpleNamespace(pad_token_id=PAD_ID, eos_token_id=EOS_ID)
    B, span = PROMPTS * SAMPLES, 512
    engine = EngineBackend(model, tokenizer, max_rows=B, max_length=1024)
    engine.generate(prompts, SamplingParams(max_tokens=2, n=SAMPLES, ignore_eos=True))  # cache, rope, graphs
    tokens = torch.full((B,), 5, dtype=torch.long, device=device)
    positions = torch.full_like(tokens, 300)
    lines = []
    with torch.no_grad():
        replay = per_call_ms(lambda: engine.graphs(tokens, positions, span))
        logits = engine.graphs(tokens, positions, span).clone()
        params = SamplingParams(max_tokens=8, temperature=1.0)
        sampler = per_call_ms(lambda: sample(logits, params, 1, None, None, None, False))
        one_pass = per_call_ms(lambda: sample(logits, params, 1, None, None, None, False, seed=7))
        lines.append(f"batch {B}, span {span}: graph replay {replay:.3f} ms/step; sampler (temperature 1): "
                     f"PyTorch {sampler:.3f} ms, one-pass Triton {one_pass:.3f} ms")
        step = engine._step_fn()
        step(engine.dec, engine.cache, engine.rope, tokens, positions, span)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step(engine.dec, engine.cache, engine.rope, tokens, positions, span)
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.self_device_time_total for e in events)
    count = sum(e.count for e in events)
    lines.append(f"one eager forward ({step.__name__}): {count} kernels, {total_us / 1e3:.3f} ms of kernel time; top:")
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:10]
    lines += [f"    {e.self_device_time_total / 1e3:7.3f} ms  x{e.count:<4d} {e.key[:100]}" for e in top]
    engine.close()
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ report
def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[Row], floors: dict[tuple[str, int], float]) -> str:
    lines = ["| shape | new tokens | system | whole call s | tokens/s | ms / decode step | floor ms | step / floor "
             "| engine speed-up | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.shape} | {r.new_tokens} | {r.system} | failed: {r.error} | | | | | | |")
            continue
        floor = floors.get((r.shape, r.new_tokens))
        ours = next((o for o in rows if o.shape == r.shape and o.new_tokens == r.new_tokens
                     and o.system.startswith("engine") and o.total_s), None)  # the first engine row that ran
        speedup = f"{r.total_s / ours.total_s:.1f}x" if ours and not r.system.startswith("engine") else "-"
        ratio = r.step_ms() / floor if r.step_ms() and floor == floor and floor else None
        lines.append(f"| {r.shape} | {r.new_tokens} | {r.system} | {fmt(r.total_s, '.3f')} | "
                     f"{fmt(r.tokens_per_s(), ',.0f')} | {fmt(r.step_ms(), '.3f')} | {fmt(floor, '.3f')} | "
                     f"{fmt(ratio, '.1f')} | {speedup} | {fmt(r.peak_gib, '.1f')} |")
    return "\n".join(lines)


def header(device: str, mode: str, rate: float) -> str:
    if device == "cuda":
        prop = torch.cuda.get_device_properties(0)
        card = f"{torch.cuda.get_device_name(0)} ({prop.multi_processor_count} SMs, {prop.total_memory / 2**30:.0f} GiB)"
    else:
        card = f"CPU ({platform.machine()}), smoke run: the numbers mean nothing"
    try:
        tf = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        tf = "?"
    return "\n".join([
        "## Generation (`benchmarks/bench_generation.py`)",
        "",
        f"- card: {card}",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; mode: {mode}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"transformers {tf}; commit {_git_commit()}",
        f"- workload: {PROMPTS} prompts x {SAMPLES} samples, prompt lengths uniform in {list(PROMPT_LENS)} (seed 0), "
        "random weights in bf16, temperature 1, EOS ignored (every system generates exactly the new tokens)",
        f"- copy bandwidth (1 GiB device-to-device, read + write): {rate / 1e12:.2f} TB/s. Floor = (all weights + KV "
        "cache at the mean context) / that rate. 'engine speed-up' = that row's time / the engine's.",
        "- ms / decode step = (whole call - a 1-new-token call) / (new tokens - 1); for the static-compile path "
        "(whose 1-token call would compile another cache size) it is whole call / new tokens, prefill included.",
    ])


def write_section(path: Path, body: str) -> None:
    results_md.write_section(path, "generation", body)


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="512 new tokens, static compile on 0.5B only (~4 min on an H200)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="markdown file to update (default: benchmarks/RESULTS.md on CUDA)")
    ap.add_argument("--shapes", default="0.5b,1.5b", help="comma list of 0.5b, 1.5b")
    ap.add_argument("--new-tokens", default=None, help="comma list (default 512,1024; quick 512)")
    ap.add_argument("--no-static", action="store_true", help="skip the static cache + torch.compile rows")
    ap.add_argument("--no-hf", action="store_true", help="engine only")
    args = ap.parse_args(argv)

    device = args.device
    cpu = device != "cuda"
    if cpu:
        shapes, new_tokens, prompt_lens = [CPU_TINY], [8], (5, 12)
    else:
        table_shapes = {"0.5b": QWEN_05B, "1.5b": QWEN_15B}
        shapes = [table_shapes[s.strip()] for s in args.shapes.split(",")]
        new_tokens = [int(x) for x in (args.new_tokens or ("512" if args.quick else "512,1024")).split(",")]
        prompt_lens = PROMPT_LENS
    repeats = 2 if args.quick or cpu else 3
    mode = "cpu smoke" if cpu else ("quick" if args.quick else "full")
    rate = copy_rate(device)
    print(f"device {device}, copy rate {rate / 1e12:.2f} TB/s, mode {mode}", flush=True)

    rows: list[Row] = []
    floors: dict[tuple[str, int], float] = {}
    notes: list[str] = []
    dtype = torch.bfloat16 if not cpu else torch.float32
    for si, shape in enumerate(shapes):
        model = build_model(shape, device, dtype)
        prompts = make_prompts(shape.vocab, prompt_lens)
        if si == 0 and not cpu:
            try:
                notes.append(f"{shape.name}: " + diagnose_engine(model, prompts, device))
                print(notes[-1], flush=True)
            except Exception as exc:
                print(f"profile failed: {short(exc)}", flush=True)
        for T in new_tokens:
            label = f"{shape.name}, {T} new"
            floors[(shape.name, T)] = floor_ms(model, shape, prompts, T, rate)
            for system, options in ENGINE_VARIANTS:
                try:
                    rows.append(run_engine(model, prompts, T, device, repeats, label, system, **options))
                    break
                except Exception as exc:
                    traceback.print_exc()
                    rows.append(Row("", T, system, error=short(exc)))
            if si == 0 and not cpu and not any(r.system == COMPARE_VARIANT[0] for r in rows if r.new_tokens == T):
                try:
                    rows.append(run_engine(model, prompts, T, device, repeats, label, COMPARE_VARIANT[0],
                                           **COMPARE_VARIANT[1]))
                except Exception as exc:
                    rows.append(Row("", T, COMPARE_VARIANT[0], error=short(exc)))
            if not args.no_hf:
                rows.append(run_hf(model, prompts, T, device, 1, static=False, label=label))
                static_here = not args.no_static and not cpu and (not args.quick or si == 0)
                if static_here:
                    rows.append(run_hf(model, prompts, T, device, 1, static=True, label=label))
                    torch._dynamo.reset()  # the compiled forward holds this model's graphs
            for r in rows:
                r.shape = r.shape or shape.name
            print(table([r for r in rows if r.shape == shape.name and r.new_tokens == T], floors), flush=True)
        del model
        reset_peak(device)

    body = header(device, mode, rate) + "\n\n" + table(rows, floors) + "\n"
    if notes:
        body += "\n" + "\n".join(f"- {n}".replace("\n", "\n  ") for n in notes) + "\n"
    print("\n" + body)
    out = args.out if args.out is not None else (None if cpu else DEFAULT_OUT)
    if out is not None:
        write_section(out, body)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
