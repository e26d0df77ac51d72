"""Temperature sampling in one pass over the logits: the common GRPO case (no top-k/top-p/min-p).

The PyTorch sampler makes ~7 passes over a float32 copy of the [B, V] logits (cast, scale,
softmax, noise, clamp, divide, argmax: ~270 MB at B = 64, V = 151936); this kernel reads the bf16
logits once (~19 MB). Gumbel-max: argmax(l / T + g) with g = -log(-log(u)), u uniform from
Triton's counter-based Philox stream keyed by (seed, row, token), draws token i with probability
softmax(l / T)_i; the same sweep keeps a running log-sum-exp for the token's log-prob.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 4096  # 37 iterations over V = 151936; one program per row


@triton.jit
def _gumbel_sample_kernel(logits_ptr, tokens_ptr, logps_ptr, V, stride, inv_temp, seed,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    run_max = tl.full([BLOCK], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        idx = start + cols
        mask = idx < V
        x = tl.load(logits_ptr + row * stride + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        u = tl.rand(seed, row * V + idx)  # [0, 1)
        g = -tl.log(-tl.log(tl.maximum(u, 1e-12)))
        score = tl.where(mask, x + g, float("-inf"))
        take = score > best
        best = tl.where(take, score, best)
        best_idx = tl.where(take, idx, best_idx)
        new_max = tl.maximum(run_max, x)
        # Lanes that have seen only -inf keep a zero sum (exp(-inf - -inf) would be NaN).
        run_sum = tl.where(new_max == float("-inf"), 0.0,
                           run_sum * tl.exp(run_max - new_max) + tl.exp(x - new_max))
        run_max = new_max
    top = tl.max(best, axis=0)
    token = tl.min(tl.where(best == top, best_idx, 2147483647), axis=0)
    m = tl.max(run_max, axis=0)
    total = tl.sum(tl.where(run_max == float("-inf"), 0.0, run_sum * tl.exp(run_max - m)), axis=0)
    x_tok = tl.load(logits_ptr + row * stride + token).to(tl.float32) * inv_temp
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(logps_ptr + row, x_tok - m - tl.log(total))


def gumbel_sample(logits: torch.Tensor, temperature: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] (any float dtype, unit stride along V) -> tokens [B] long, log-probs [B] float32
    under softmax(logits / temperature). `seed` keys the random stream: change it every step."""
    B, V = logits.shape
    assert logits.stride(1) == 1 and temperature > 0
    tokens = torch.empty(B, dtype=torch.long, device=logits.device)
    logps = torch.empty(B, dtype=torch.float32, device=logits.device)
    _gumbel_sample_kernel[(B,)](logits, tokens, logps, V, logits.stride(0), 1.0 / temperature, seed,
                                BLOCK=min(BLOCK_V, triton.next_power_of_2(V)))
    return tokens, logps
