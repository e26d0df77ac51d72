#!/usr/bin/env python
"""The update phase's kernel floor on this card: the matmuls and attention that any trainer must run
for the bench_e2e update case, each timed alone at its real shape, and summed.

Why: issue targets state ratios against TRL ("update time <= 0.6x TRL's", "the fused loss within
1.05x of plain bf16 at no more memory than CCE"). A ratio is reachable only if the work it leaves
room for runs at a rate this card reaches. FLOP counts divided by the datasheet peak say little,
because neither cuBLAS nor any attention kernel runs at that peak; this script times the kernels
themselves, so its floor is a sum of measured times. Everything else a step does (norms, rotary,
SwiGLU, residual adds, the log-softmax, the loss, casts, the host) comes on top, so a real step is
slower than the floor.

Update case (bench_e2e): 8 generations of a 256-token prompt and a fixed completion of L tokens, so
T = 8 x (256 + L) tokens; beta > 0, so a reference forward. Per decoder layer the projections
q, k, v, o, gate, up, down: forward = X @ W^T, backward = dY @ W and dY^T @ X. Where two
projections read the same input (q/k/v, gate/up) the floor takes the faster of separate and
concatenated weights. Attention: causal, 8 sequences of 256 + L, GQA; the fastest of the flash,
cuDNN and memory-efficient SDPA backends, each given the grouped key/value heads (enable_gqa) and
given them expanded to the query heads (the expansion itself not timed). LM head: the
completion's T_c = 8 x L tokens against V = 151936, forward for the reference and the policy, and
the two backward GEMMs. Optimizer: fused AdamW over the model's parameters. Counted: reference
forward + policy forward + backward, plus with gradient checkpointing one more forward of the body
(not the head).

Second table: the fused linear GRPO loss at N = 8192, V = 151936 (issue 8's kernel case). Any design
whose extra memory stays at CCE's (the returned gradients and almost nothing else) cannot hold a
chunk of full-vocabulary rows, and a row's d(logits) needs its log-sum-exp over the whole vocabulary,
so it computes the logits twice: four GEMMs. A design that keeps a chunk of Nc full rows runs three
GEMMs, but re-reads and re-writes d(weight) (V x H bf16) once per chunk; the table gives that traffic
at the copy rate for a few Nc. Baseline in the same run: bf16 logits + bf16 cross-entropy.

    source benchmarks/gpu_env.sh && python benchmarks/bench_update_floor.py [--out benchmarks/RESULTS.md]
    python benchmarks/bench_update_floor.py --device cpu     # smoke run (times mean nothing)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import results_md  # noqa: E402
from bench_generation import copy_rate  # noqa: E402
from bench_layers import timed_us  # noqa: E402
from shapes import QWEN_05B, QWEN_15B  # noqa: E402

SECTION = "update_floor"
PROMPT, GENERATIONS = 256, 8


def timed_ms(fn, device: str, reps: int = 10) -> float:
    return timed_us(fn, device, reps) / 1e3


def randn(*shape, device, dtype=torch.bfloat16):
    return torch.randn(*shape, device=device, dtype=dtype)


def linear_ms(T: int, ins: int, outs: tuple[int, ...], device: str, reps: int) -> tuple[float, float]:
    """Forward and backward (d(input) + d(weight)) of projections sharing one input, in ms: the
    faster of separate weights and one concatenated weight."""
    x = randn(T, ins, device=device)
    best_f, best_b = float("inf"), float("inf")
    for widths in (outs, (sum(outs),)) if len(outs) > 1 else (outs,):
        ws = [randn(o, ins, device=device) / ins ** 0.5 for o in widths]
        dys = [randn(T, o, device=device) for o in widths]
        fwd = timed_ms(lambda: [x @ w.t() for w in ws], device, reps)
        bwd = timed_ms(lambda: [(dy @ w, dy.t() @ x) for w, dy in zip(ws, dys)], device, reps)
        best_f, best_b = min(best_f, fwd), min(best_b, bwd)
    return best_f, best_b


def attention_ms(seqs: int, S: int, heads: int, kv_heads: int, head_dim: int, device: str,
                 reps: int) -> tuple[float, float, str]:
    """Causal attention forward and backward in ms: the fastest SDPA backend that runs, given the
    key/value heads as they are (enable_gqa) or expanded to the query heads (the expansion untimed)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = randn(seqs, heads, S, head_dim, device=device).requires_grad_()
    grouped = [randn(seqs, kv_heads, S, head_dim, device=device).requires_grad_() for _ in range(2)]
    expanded = [t.detach().repeat_interleave(heads // kv_heads, dim=1).requires_grad_() for t in grouped]
    dout = randn(seqs, heads, S, head_dim, device=device)
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION),
                ("efficient", SDPBackend.EFFICIENT_ATTENTION)] if device == "cuda" else [("math", SDPBackend.MATH)]
    layouts = [("grouped", grouped, True), ("expanded", expanded, False)] if kv_heads != heads else [
        ("", expanded, False)]
    best = (float("inf"), float("inf"), "none")
    for (name, backend), (layout, (k, v), gqa) in ((b, lay) for b in backends for lay in layouts):
        label = f"{name} {layout}".strip()
        try:
            with sdpa_kernel([backend]):
                def fwd():
                    with torch.no_grad():
                        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

                def fwd_bwd():
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
                    torch.autograd.grad(out, (q, k, v), dout)
                f = timed_ms(fwd, device, reps)
                fb = timed_ms(fwd_bwd, device, reps)
        except RuntimeError as exc:  # a backend that does not take this shape on this card
            print(f"  attention {label}: {str(exc).splitlines()[0][:100]}", flush=True)
            continue
        print(f"  attention {label}: forward {f:.2f} ms, backward {fb - f:.2f} ms", flush=True)
        if 2 * f + fb < 3 * best[0] + best[1]:  # as the checkpointed floor weighs it: three forwards, one backward
            best = (f, fb - f, label)
    return best


def adamw_ms(numels: list[int], device: str, reps: int) -> float:
    params = [torch.nn.Parameter(randn(n, device=device)) for n in numels]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-6, fused=device == "cuda")
    return timed_ms(opt.step, device, reps)


def update_floor(shape, L: int, device: str, reps: int, vocab: int) -> dict:
    H, I, Hq, Hkv = shape.hidden, shape.intermediate, shape.heads, shape.kv_heads
    d = H // Hq
    S = PROMPT + L
    T, Tc = GENERATIONS * S, GENERATIONS * L
    qkv_f, qkv_b = linear_ms(T, H, (H, Hkv * d, Hkv * d), device, reps)
    o_f, o_b = linear_ms(T, H, (H,), device, reps)
    gu_f, gu_b = linear_ms(T, H, (I, I), device, reps)
    dn_f, dn_b = linear_ms(T, I, (H,), device, reps)
    att_f, att_b, backend = attention_ms(GENERATIONS, S, Hq, Hkv, d, device, reps)
    layer_f = qkv_f + o_f + gu_f + dn_f + att_f
    layer_b = qkv_b + o_b + gu_b + dn_b + att_b
    head_f, head_b = linear_ms(Tc, H, (vocab,), device, reps)
    per_layer = [H * H + H, 2 * (Hkv * d * H + Hkv * d), H * H, 2 * I * H, I * H, 2 * H]
    opt = adamw_ms([n for _ in range(shape.layers) for n in per_layer] + [vocab * H, H], device, reps)
    body_f, body_b = shape.layers * layer_f, shape.layers * layer_b
    plain = 2 * (body_f + head_f) + body_b + head_b + opt
    return {"shape": shape.name, "L": L, "T": T, "attention": backend,
            "layer_f": layer_f, "layer_b": layer_b, "att_f": att_f, "att_b": att_b, "head_f": head_f,
            "head_b": head_b, "opt": opt, "floor": plain / 1e3, "floor_ckpt": (plain + body_f) / 1e3}


def head_case(N: int, H: int, V: int, device: str, reps: int, rate: float) -> dict:
    """Issue 8's fused-loss case: the GEMMs alone, and the plain bf16 path they are compared with."""
    h = randn(N, H, device=device).requires_grad_()
    w = (randn(V, H, device=device) / H ** 0.5).requires_grad_()
    dz = randn(N, V, device=device)
    idx = torch.randint(0, V, (N,), device=device)
    with torch.no_grad():
        logits = timed_ms(lambda: h @ w.t(), device, reps)
        d_hidden = timed_ms(lambda: dz @ w, device, reps)
        d_weight = timed_ms(lambda: dz.t() @ h, device, reps)

    def plain():
        loss = F.cross_entropy(h @ w.t(), idx)
        torch.autograd.grad(loss, (h, w))
    plain_ms = timed_ms(plain, device, reps)
    three = logits + d_hidden + d_weight
    # Per chunk of Nc full rows, d(weight) += d(logits)^T @ h reads and writes V x H bf16.
    traffic = {nc: (N // nc) * 2 * V * H * 2 / rate * 1e3 for nc in (256, 1024, 2048)}
    return {"H": H, "logits": logits, "d_hidden": d_hidden, "d_weight": d_weight, "three": three,
            "four": three + logits, "plain": plain_ms, "traffic": traffic,
            "chunk_mib": {nc: nc * V * 2 / 2 ** 20 for nc in traffic}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", default="1024,2048,8192")
    ap.add_argument("--out", type=Path, default=None, help="markdown file to update (default on CUDA: RESULTS.md)")
    args = ap.parse_args(argv)
    device = args.device
    cpu = device == "cpu"
    torch.manual_seed(0)
    reps = 2 if cpu else 10
    if cpu:  # the same code at toy sizes: a smoke run, not a measurement
        from shapes import Shape
        shapes, lengths, vocab = [Shape("tiny", 64, 2, 4, 2, 96, 1000)], [16], 1000
        head_N, head_H, head_V = 64, (32,), 1000
    else:
        shapes, lengths, vocab = [QWEN_05B, QWEN_15B], [int(x) for x in args.lengths.split(",")], 151936
        head_N, head_H, head_V = 8192, (896, 1536, 3584), 151936
    rate = copy_rate(device)
    rows = []
    for shape in shapes:
        for L in lengths:
            r = update_floor(shape, L, device, reps, vocab)
            rows.append(r)
            print(f"{r['shape']} L={L}: floor {r['floor']:.3f} s, with checkpointing {r['floor_ckpt']:.3f} s "
                  f"(layer fwd {r['layer_f']:.2f} ms, bwd {r['layer_b']:.2f} ms, attention {r['attention']})", flush=True)
            torch.cuda.empty_cache() if device == "cuda" else None
    heads = [head_case(head_N, H, head_V, device, reps, rate) for H in head_H]
    for r in heads:
        print(f"head H={r['H']}: 3 GEMMs {r['three']:.2f} ms, 4 GEMMs {r['four']:.2f} ms, plain bf16 CE {r['plain']:.2f} ms",
              flush=True)

    lines = ["| shape | completion | tokens | one layer: forward, backward (ms) | of which attention | LM head: "
             "forward, backward (ms) | AdamW (ms) | floor | floor with checkpointing |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['L']} | {r['T']} | {r['layer_f']:.2f}, {r['layer_b']:.2f} | "
                     f"{r['att_f']:.2f}, {r['att_b']:.2f} ({r['attention']}) | {r['head_f']:.2f}, {r['head_b']:.2f} | "
                     f"{r['opt']:.2f} | {r['floor']:.3f} s | {r['floor_ckpt']:.3f} s |")
    lines += ["", f"Fused linear GRPO loss case: N = {head_N}, V = {head_V}, bf16. 'd(weight) traffic' = re-reading "
              "and re-writing V x H bf16 once per chunk of Nc rows, at the copy rate.", "",
              "| H | logits GEMM | d(hidden) GEMM | d(weight) GEMM | 3 GEMMs | 4 GEMMs (recompute) | plain bf16 "
              "logits + bf16 CE | 1.05x plain | d(weight) traffic, Nc = 256 / 1024 / 2048 (chunk MiB) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in heads:
        tr = " / ".join(f"{r['traffic'][nc]:.1f}" for nc in r["traffic"])
        mib = " / ".join(f"{r['chunk_mib'][nc]:.0f}" for nc in r["chunk_mib"])
        lines.append(f"| {r['H']} | {r['logits']:.2f} | {r['d_hidden']:.2f} | {r['d_weight']:.2f} | {r['three']:.2f} | "
                     f"{r['four']:.2f} | {r['plain']:.2f} | {1.05 * r['plain']:.2f} | {tr} ms ({mib}) |")
    out = args.out if args.out is not None else (None if cpu else HERE / "RESULTS.md")
    results_md.publish(out, SECTION, "The update's kernel floor (`bench_update_floor.py`)",
                       f"bf16; median of {reps} after 3 warm-ups; copy rate {rate / 1e12:.2f} TB/s. Matmuls and "
                       "attention only, each timed alone at the update case's shapes (8 x (256 + completion) tokens) "
                       "and summed: reference forward + policy forward + backward (+ one body forward with "
                       "checkpointing) + AdamW.", "\n".join(lines), cpu)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
