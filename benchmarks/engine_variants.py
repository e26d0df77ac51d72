#!/usr/bin/env python
"""A/B the engine's kernel switches on the generation benchmark's workload, in one process.

Each variant sets module-level switches of the engine (skinny GEMMs on/off, down_proj split-K,
decode attention variant, programmatic dependent launch), then times the engine alone, exactly as
bench_generation.py does (same model, prompts, floor and ms-per-decode-step definition). Prints
one table and writes it into its section of benchmarks/RESULTS.md (--out).

    source benchmarks/gpu_env.sh && python benchmarks/engine_variants.py [--shapes 0.5b] [--new-tokens 512]
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_generation as bg  # noqa: E402  (benchmarks/ is on sys.path)
import results_md  # noqa: E402

SECTION = "engine_variants"

# name -> {(module, attribute): value}; every variant starts from the defaults below.
VARIANTS = {
    "default": {},
    "two-kernel attention": {("decode_kernel", "VARIANT"): "two_kernel"},
    "attention 64-key blocks x 3 stages": {("decode_kernel", "BLOCK_N"): 64, ("decode_kernel", "NUM_STAGES"): 3},
    "o_proj unsplit": {("skinny", "O_SPLIT"): 0},
    "no PDL": {("pdl", "ENABLED"): False},
    "sampler in the graph": {("engine", "GRAPH_SAMPLER"): True},
    "gate/up 4 stages": {("skinny", "GATE_UP_CONFIG"): (64, 128, 4, 4), ("skinny", "GATE_UP_LARGE_CONFIG"): (64, 128, 4, 4)},
    "gate/up 64 columns": {("skinny", "GATE_UP_LARGE_CONFIG"): (64, 128, 4, 3)},
    "gate/up 32 columns": {("skinny", "GATE_UP_CONFIG"): (32, 128, 4, 3)},
    "attention unsplit": {("decode_kernel", "SPLIT_TOKENS"): 1 << 20},
    "attention 1 program per SM": {("decode_kernel", "PROGRAMS_PER_SM"): 1},
    "attention 6 programs per SM": {("decode_kernel", "PROGRAMS_PER_SM"): 6},
    "attention 8 warps": {("decode_kernel", "NUM_WARPS"): 8},
    "sampler 8192-token blocks": {("sample_kernel", "BLOCK_V"): 8192},
    "sampler 2 programs per SM": {("sample_kernel", "PROGRAMS_PER_SM"): 2},
    "sampler 8 programs per SM": {("sample_kernel", "PROGRAMS_PER_SM"): 8},
    "sampler pick 8 warps": {("sample_kernel", "PICK_WARPS"): 8},
    "attention 128-key blocks x 3 stages": {("decode_kernel", "BLOCK_N"): 128, ("decode_kernel", "NUM_STAGES"): 3},
    "cuBLAS projections": {("skinny", "ENABLED"): False},
    "down_proj on cuBLAS": {("skinny", "DOWN_SPLIT"): 0},
    "down split-K 2": {("skinny", "DOWN_SPLIT"): 2},
    "down split-K 8": {("skinny", "DOWN_SPLIT"): 8},
}


def modules():
    from atlas_fast.rollout import engine
    from atlas_fast.rollout.engine import decode_kernel, pdl, sample_kernel, skinny
    return {"skinny": skinny, "decode_kernel": decode_kernel, "pdl": pdl, "engine": engine,
            "sample_kernel": sample_kernel}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="0.5b")
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--only", default=None, help="comma list of variant names")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    args = ap.parse_args(argv)
    device = "cuda"
    mods = modules()
    defaults = {key: getattr(mods[key[0]], key[1]) for v in VARIANTS.values() for key in v}
    rate = bg.copy_rate(device)
    names = args.only.split(",") if args.only else list(VARIANTS)
    lines = ["| shape | variant | ms / decode step | floor ms | step / floor | whole call s |", "|---|---|---|---|---|---|"]
    for key in args.shapes.split(","):
        shape = {"0.5b": bg.QWEN_05B, "1.5b": bg.QWEN_15B}[key]
        model = bg.build_model(shape, device, torch.bfloat16)
        prompts = bg.make_prompts(shape.vocab, bg.PROMPT_LENS)
        floor = bg.floor_ms(model, shape, prompts, args.new_tokens, rate)
        for name in names:
            for (mod, attr), value in defaults.items():
                setattr(mods[mod], attr, value)
            for (mod, attr), value in VARIANTS[name].items():
                setattr(mods[mod], attr, value)
            system, options = bg.ENGINE_VARIANTS[0]
            try:
                row = bg.run_engine(model, prompts, args.new_tokens, device, 2, f"{shape.name}, {name}", system,
                                    **options)
                if row.error:
                    raise RuntimeError(row.error)
                ms = row.step_ms()
                lines.append(f"| {shape.name} | {name} | {ms:.3f} | {floor:.3f} | {ms / floor:.2f} | {row.total_s:.3f} |")
            except Exception as exc:  # a variant that fails is reported, the others still run
                lines.append(f"| {shape.name} | {name} | failed: {bg.short(exc)} | | | |")
            print(lines[-1], flush=True)
        for (mod, attr), value in defaults.items():
            setattr(mods[mod], attr, value)
        del model
    print("\n" + "\n".join(lines))
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = (f"## The engine's kernel switches, A/B (`engine_variants.py`)\n\n{torch.cuda.get_device_name()}, {when}, "
            f"commit {os.environ.get('ATLAS_FAST_COMMIT', 'unknown')}; 8 prompts x 8 samples, "
            f"{args.new_tokens} new tokens, bf16, EOS ignored; ms per decode step and floor as in the generation "
            f"table. Defaults: {', '.join(f'{m}.{a}={v!r}' for (m, a), v in defaults.items())}.\n\n" + "\n".join(lines))
    results_md.write_section(args.out, SECTION, body)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
