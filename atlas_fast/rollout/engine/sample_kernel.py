"""Temperature sampling in one pass over the logits: the common GRPO case (no top-k/top-p/min-p).

The PyTorch sampler makes ~7 passes over a float32 copy of the [B, V] logits (cast, scale,
softmax, noise, clamp, divide, argmax: ~270 MB at B = 64, V = 151936); this sampler reads the bf16
logits once (~19 MB) plus one block per row. It inverts the CDF of softmax(l / T) with one uniform
per row instead of racing a random number against every token: the Gumbel-max sweep it replaces
drew a Philox number and took two precise logs per token, ~90 us per step on an H200 at B = 64,
V = 151936 against ~5 us to read the logits, ~9% of a decode step.

1. `_block_stats_kernel`, grid (B, C): the vocabulary in blocks of BLOCK_V tokens; for each block,
   its max logit m_b and s_b = sum exp((l - m_b) / T) (one exp per token, no random numbers).
   Programs take C contiguous runs of blocks so that ~4 programs per SM share the sweep.
2. `_pick_kernel`, one program per row: block weights w_b = s_b exp(m_b - m), their cumulative
   sum, one uniform u keyed by (seed, row) and target u * total pick the block; its logits are
   re-read (4096 tokens, ~8 KB) and the token is the first whose in-block cumulative weight passes
   what remains of the target. Its log-prob (l - m) / T - log(total) uses the same stats. The draw
   depends on the per-block stats only, so it is bitwise the same whatever C is.

Everything runs in base 2 (differences of logits times log2(e) / T, then exp2): a CUDA `exp` is a
multiply then `ex2` anyway.

`sample_tokens_into` is the engine's decode step: its pick kernel also records the draw (output
row, log-prob, finished flag, next input token and position) in the same per-row program. The
PyTorch bookkeeping it replaces was ~7 small kernels per step (where, two index_puts, a gather, an
or, an add: ~2-3 us each plus launch gaps at B = 64), against one ~1.2 ms decode step on an H200.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# Tokens per block: the sweep's unit and the pick's re-read. 4096 keeps the stats small (38 per
# row at V = 151936, one masked load in the pick) while the pick's scan over one block stays an
# 8 KB bf16 load and a 16 KB float32 scan.
BLOCK_V = 4096
# Programs to aim for over the vocabulary: 4 per SM. On an H200 one program per row (64 programs,
# 37 serial blocks each) took 0.26 ms at B = 64, V = 151936 for the Gumbel-max sweep this replaced:
# a per-row sweep is bound by its serial chain, not by bytes.
PROGRAMS_PER_SM = 4
# Warps of the per-row pick: 64 programs at B = 64 leave half of an H200's 132 SMs idle, so the
# pick is latency-bound (stats load -> block load -> scan -> stores). At 4 warps each thread holds
# 32 tokens of a 4096-token block (four 16-byte bf16 loads) and a block-wide reduction or scan
# crosses only 4 warps (the compiled pick has 33 barriers).
PICK_WARPS = 4
LOG2E = math.log2(math.e)


@triton.jit
def _block_stats_kernel(logits_ptr, max_ptr, sum_ptr, V, stride, scale, CHUNK, NB, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    lo = chunk * CHUNK
    hi = tl.minimum(lo + CHUNK, V)
    # Each block's stats stand alone (no running max carried from one block to the next): the pick
    # rescales them to the row max, and they are the same whatever the chunking.
    for start in range(lo, hi, BLOCK):
        idx = start + cols
        x = tl.load(logits_ptr + row * stride + idx, mask=idx < hi, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)  # unscaled: see _pick on why the scale comes after the difference
        safe = tl.where(m == float("-inf"), 0.0, m)  # an all -inf block: every term is exp2(-inf) = 0, not NaN
        s = tl.sum(tl.exp2((x - safe) * scale), axis=0)
        out = row * NB + start // BLOCK
        tl.store(max_ptr + out, m)
        tl.store(sum_ptr + out, s)


@triton.jit
def _pick(logits_ptr, max_ptr, sum_ptr, V, stride, scale, seed, NB, BLOCK: tl.constexpr, NBP: tl.constexpr):
    """Row `program_id(0)`'s draw from its NB block stats -> (token int32, log-prob float32)."""
    row = tl.program_id(0)
    b = tl.arange(0, NBP)
    m = tl.load(max_ptr + row * NB + b, mask=b < NB, other=float("-inf"))
    s = tl.load(sum_ptr + row * NB + b, mask=b < NB, other=0.0)
    m_all = tl.max(m, axis=0)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)  # an all -inf row: weights 0, no NaN
    w = tl.where(m == float("-inf"), 0.0, s * tl.exp2((m - m_safe) * scale))
    cum = tl.cumsum(w, axis=0)
    # The total is the scan's own last value (not a separately ordered sum), so target < total
    # agrees with the comparisons below up to the one rounding of u * total.
    total = tl.max(cum, axis=0)
    target = tl.rand(seed, row) * total  # u in [0, 1): one Philox draw per row
    # The first block whose running weight passes the target; only blocks with weight count, and
    # if rounding leaves none (u * total rounded up to total) the last block with weight is it.
    blk = tl.min(tl.where((cum > target) & (w > 0), b, NBP), axis=0)
    last_blk = tl.max(tl.where(w > 0, b, -1), axis=0)
    blk = tl.maximum(tl.where(blk == NBP, last_blk, blk), 0)
    prev = tl.max(tl.where(b < blk, cum, 0.0), axis=0)  # weight of the blocks before it
    w_blk = tl.max(tl.where(b == blk, w, 0.0), axis=0)
    # Re-read that block: its exact per-token weights relative to the row max.
    cols = tl.arange(0, BLOCK)
    idx = blk * BLOCK + cols
    x = tl.load(logits_ptr + row * stride + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
    # Differences of raw logits, scaled after: x*scale - m would let the compiler contract the two
    # into one FMA that skips the product's rounding, so the row's top token would sit a few ulps
    # off 0 (and its log-prob off 0 when it holds all the mass).
    e = tl.exp2((x - m_safe) * scale)
    ecum = tl.cumsum(e, axis=0)
    # The block's weight was summed in another order (relative to m_b, then scaled) than this scan:
    # the remaining target is mapped as a fraction of the block onto the scan's own total, so the
    # ~1e-7 mismatch cannot pile up on the block's last token.
    frac = (target - prev) / tl.where(w_blk > 0, w_blk, 1.0)  # w_blk = 0 only for an all -inf row
    remaining = frac * tl.max(ecum, axis=0)
    # A token with e == 0 (a -inf logit) is never chosen, even if the scan's rounding moved past it.
    k = tl.min(tl.where((ecum > remaining) & (e > 0), cols, BLOCK), axis=0)
    last_k = tl.max(tl.where(e > 0, cols, -1), axis=0)
    k = tl.maximum(tl.where(k == BLOCK, last_k, k), 0)
    x_tok = tl.max(tl.where(cols == k, x, float("-inf")), axis=0)
    # Back to nats (* ln 2). total >= 1 (the max block has s_b >= 1 at weight 1), so the log-prob
    # is <= 0 but for rounding; an all -inf row (nothing to draw) gets token 0 at -inf, not NaN.
    logp = tl.minimum((x_tok - m_safe) * scale * 0.6931471805599453 - tl.log(tl.maximum(total, 1.0)), 0.0)
    return (blk * BLOCK + k).to(tl.int32), logp


# `seed` changes every step: left unspecialised so seed = 1 or seed % 16 == 0 compile no extra variants.
@triton.jit(do_not_specialize=["seed"])
def _pick_kernel(logits_ptr, max_ptr, sum_ptr, tokens_ptr, logps_ptr, V, stride, scale, seed, NB,
                 BLOCK: tl.constexpr, NBP: tl.constexpr):
    row = tl.program_id(0)
    token, logp = _pick(logits_ptr, max_ptr, sum_ptr, V, stride, scale, seed, NB, BLOCK, NBP)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(logps_ptr + row, logp)


# `t` and `seed` change every launch: left unspecialised so t or seed = 1 or % 16 == 0 compile no
# extra variants.
@triton.jit(do_not_specialize=["t", "seed"])
def _pick_record_kernel(logits_ptr, max_ptr, sum_ptr, V, stride, scale, seed, NB,
                        finished_ptr, rows_ptr, out_tokens_ptr, out_tokens_stride, out_logps_ptr,
                        out_logps_stride, t, stop_ptr, next_ptr, positions_ptr, advance, pad_id, step_ptr,
                        HAS_LOGPS: tl.constexpr, HAS_STOP: tl.constexpr, STEP_IN_MEMORY: tl.constexpr,
                        BLOCK: tl.constexpr, NBP: tl.constexpr):
    slot = tl.program_id(0)
    if STEP_IN_MEMORY:  # a CUDA graph's replays: the step and its seed come from the device
        t = tl.load(step_ptr)
        seed = (tl.load(step_ptr + 1) + t) % 2147483648
    token, logp = _pick(logits_ptr, max_ptr, sum_ptr, V, stride, scale, seed, NB, BLOCK, NBP)
    done = tl.load(finished_ptr + slot) != 0
    token = tl.where(done, pad_id, token).to(tl.int64)
    out_row = tl.load(rows_ptr + slot)  # padding slots share the dummy row; they all write pad_id and 0
    tl.store(out_tokens_ptr + out_row * out_tokens_stride + t, token)
    if HAS_LOGPS:
        tl.store(out_logps_ptr + out_row * out_logps_stride + t, tl.where(done, 0.0, logp))
    if HAS_STOP:
        done = done | (tl.load(stop_ptr + token) != 0)
        tl.store(finished_ptr + slot, done.to(tl.uint8))
    tl.store(next_ptr + slot, token)
    tl.store(positions_ptr + slot, tl.load(positions_ptr + slot) + advance)


def _chunks(rows: int, V: int, device: torch.device) -> tuple[int, int]:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    want = max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, rows), triton.cdiv(V, BLOCK_V)))
    chunk = triton.cdiv(triton.cdiv(V, want), BLOCK_V) * BLOCK_V
    return triton.cdiv(V, chunk), chunk


def _block_stats(logits: torch.Tensor, temperature: float, name: str):
    """The vocabulary sweep -> (per-block max [B, NB], per-block sum [B, NB], scale, kernel constexprs)."""
    B, V = logits.shape
    if logits.stride(1) != 1 or not temperature > 0:
        raise ValueError(f"{name}: needs logits with unit stride along the vocabulary (got strides "
                         f"{tuple(logits.stride())}) and temperature > 0 (got {temperature})")
    C, chunk = _chunks(B, V, logits.device)
    # A chunk is a whole number of BLOCK_V blocks; a vocabulary below one block is one smaller block.
    block = max(4, min(BLOCK_V, triton.next_power_of_2(V)))
    NB = triton.cdiv(V, block)
    stats = torch.empty((2, B, NB), dtype=torch.float32, device=logits.device)  # one allocation: max, sum
    scale = LOG2E / temperature
    _block_stats_kernel[(B, C)](logits, stats[0], stats[1], V, logits.stride(0), scale, chunk, NB, BLOCK=block)
    return stats[0], stats[1], scale, dict(BLOCK=block, NBP=triton.next_power_of_2(NB), num_warps=PICK_WARPS)


def sample_tokens(logits: torch.Tensor, temperature: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] (any float dtype, unit stride along V) -> tokens [B] long, log-probs [B] float32
    under softmax(logits / temperature). `seed` keys the random stream (one uniform per row, keyed
    by (seed, row)): change it every step."""
    B, V = logits.shape
    run_max, run_sum, scale, meta = _block_stats(logits, temperature, "sample_tokens")
    tokens = torch.empty(B, dtype=torch.long, device=logits.device)
    logps = torch.empty(B, dtype=torch.float32, device=logits.device)
    _pick_kernel[(B,)](logits, run_max, run_sum, tokens, logps, V, logits.stride(0), scale, seed, run_max.shape[1],
                       **meta)
    return tokens, logps


def sample_tokens_into(logits: torch.Tensor, temperature: float, seed: int, *, t: int, finished: torch.Tensor,
                       rows: torch.Tensor, out_tokens: torch.Tensor, out_logps: torch.Tensor | None,
                       stop_mask: torch.Tensor | None, tokens: torch.Tensor, positions: torch.Tensor,
                       advance: int, pad_id: int, step: torch.Tensor | None = None) -> None:
    """Draw as `sample_tokens` (same seed, same tokens and log-probs) and record the draw in place,
    for every slot b of B:
        token = pad_id if finished[b] else the draw
        out_tokens[rows[b], t] = token;  out_logps[rows[b], t] = 0 if finished[b] else its log-prob
        finished[b] |= stop_mask[token];  tokens[b] = token;  positions[b] += advance
    finished/rows/tokens/positions [B] (bool/long/long/long), out_* [N + 1, T]; out_logps and
    stop_mask may be None. finished is read before it is updated, as the PyTorch path does.

    `step` (int64 [2] on the device: t, base seed) replaces `t` and `seed` for launches captured in
    a CUDA graph: t = step[0], seed = (step[1] + t) % 2**31, the host's seeding of a step; the
    caller advances step[0] (and keeps t inside out_tokens)."""
    B, V = logits.shape
    for name, x, dtype in (("finished", finished, torch.bool), ("rows", rows, torch.long),
                           ("tokens", tokens, torch.long), ("positions", positions, torch.long)):
        if x.shape != (B,) or x.dtype != dtype or not x.is_contiguous():
            raise ValueError(f"sample_tokens_into: {name} must be a contiguous [{B}] {dtype} tensor, "
                             f"got {tuple(x.shape)} {x.dtype}")
    if step is not None and (step.shape != (2,) or step.dtype != torch.long or step.device != logits.device):
        raise ValueError(f"sample_tokens_into: step must be an int64 [2] tensor (t, base seed) on {logits.device}, "
                         f"got {tuple(step.shape)} {step.dtype} on {step.device}")
    if (step is None and not 0 <= t < out_tokens.shape[1]) or out_tokens.stride(1) != 1:
        raise ValueError(f"sample_tokens_into: step {t} outside out_tokens of shape {tuple(out_tokens.shape)} "
                         f"(or its last dimension is not contiguous)")
    if out_logps is not None and (out_logps.shape != out_tokens.shape or out_logps.stride(1) != 1):
        raise ValueError(f"sample_tokens_into: out_logps {tuple(out_logps.shape)} must match out_tokens "
                         f"{tuple(out_tokens.shape)} with a contiguous last dimension")
    run_max, run_sum, scale, meta = _block_stats(logits, temperature, "sample_tokens_into")
    flags = finished.view(torch.uint8)  # bool pointers as bytes: one meaning in compiled and interpreted Triton
    stop = stop_mask.view(torch.uint8) if stop_mask is not None else flags  # unread without a stop mask
    lp = out_logps if out_logps is not None else run_max  # unread without log-probs
    _pick_record_kernel[(B,)](logits, run_max, run_sum, V, logits.stride(0), scale, seed, run_max.shape[1],
                              flags, rows, out_tokens, out_tokens.stride(0), lp, lp.stride(0), t, stop,
                              tokens, positions, advance, pad_id, step if step is not None else rows,
                              HAS_LOGPS=out_logps is not None, HAS_STOP=stop_mask is not None,
                              STEP_IN_MEMORY=step is not None, **meta)
