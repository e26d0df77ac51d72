"""The engine's Triton decode attention, both merges ("two_kernel", "one_launch"), against a float64
PyTorch softmax over each row's visible keys; through the Triton interpreter on CPU (tests/conftest.py
turns it on without CUDA). Tiny odd sizes: the cache length is not a multiple of any block."""
from __future__ import annotations

import os

import pytest
import torch

from .engine_models import one_thread  # noqa: F401 (an autouse fixture)

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs CUDA or the Triton interpreter")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
S, D, SCALE = 37, 16, 0.3
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def reference(q, k, v, positions, scale, window):
    """float64 softmax attention of q [B, Hq, D] over keys lo..pos[b] of k/v [rows, Hkv, S, D]."""
    B, HQ, _ = q.shape
    G = HQ // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(B):
        pos = int(positions[b])
        lo = 0 if window is None else max(0, pos - window + 1)
        for h in range(HQ):
            keys = k[b, h // G, lo:pos + 1].double()
            w = torch.softmax((keys @ q[b, h].double()) * scale, 0)
            out[b, h] = w @ v[b, h // G, lo:pos + 1].double()
    return out.reshape(B, -1)


def inputs(seed, B, HQ, HKV, dtype, positions):
    g = torch.Generator().manual_seed(seed)
    rows = B + 2  # the cache has more rows than the batch, as the engine's does
    q = torch.randn(B, HQ, D, generator=g)
    k = torch.randn(rows, HKV, S, D, generator=g)
    v = torch.randn(rows, HKV, S, D, generator=g)
    return (q.to(dtype).to(DEVICE), k.to(dtype).to(DEVICE), v.to(dtype).to(DEVICE),
            torch.tensor(positions, dtype=torch.long, device=DEVICE))


def poison_invisible(k, v, positions, window):
    """NaN in every key/value a row must not read (past its position, before its window, rows >= B)."""
    k, v = k.clone(), v.clone()
    B = positions.shape[0]
    for t in (k, v):
        t[B:] = float("nan")
        for b in range(B):
            pos = int(positions[b])
            t[b, :, pos + 1:] = float("nan")
            if window is not None:
                t[b, :, :max(0, pos - window + 1)] = float("nan")
    return k, v


# Position 0 (one key), the last position, and rows ending inside, at the end of, and just past
# a 16-key block; 5 rows (odd).
POSITIONS = [0, 36, 15, 16, 22]


@pytest.mark.parametrize("variant", ["two_kernel", "one_launch"])
# split_tokens None: from the grid target (3 splits of 16 here); 7: more splits than blocks, keys
# per split below BLOCK_N, a window spanning two splits; 64: one split, longer than the cache.
# Each dtype meets each split size, each with and without a window across the set.
@pytest.mark.parametrize("dtype, window, split_tokens", [
    (torch.float32, None, None), (torch.float32, 5, 7), (torch.float32, None, 64),
    (torch.bfloat16, None, 7), (torch.bfloat16, 5, None), (torch.bfloat16, 5, 64)])
def test_matches_float64_reference(variant, dtype, window, split_tokens):
    from atlas_fast.rollout.engine.decode_kernel import decode_attention_triton

    q, k, v, positions = inputs(0, 5, 6, 2, dtype, POSITIONS)  # G = 3, padded to 16 rows in the dot
    k, v = poison_invisible(k, v, positions, window)
    out = decode_attention_triton(q, k, v, positions, SCALE, window, variant=variant, block_n=16,
                                  split_tokens=split_tokens)
    assert out.shape == (5, 6 * D) and out.dtype == dtype
    assert torch.isfinite(out).all()
    ref = reference(q.cpu(), torch.nan_to_num(k).cpu(), torch.nan_to_num(v).cpu(), positions.cpu(), SCALE, window)
    torch.testing.assert_close(out.cpu().double(), ref, **TOL[dtype])


@pytest.mark.parametrize("variant", ["two_kernel", "one_launch"])
@pytest.mark.parametrize("heads", [(7, 1), (3, 3)])  # Qwen2.5-0.5B's G = 7; no GQA
def test_head_layouts(variant, heads):
    from atlas_fast.rollout.engine.decode_kernel import decode_attention_triton

    HQ, HKV = heads
    q, k, v, positions = inputs(1, 3, HQ, HKV, torch.float32, [30, 2, 36])
    out = decode_attention_triton(q, k, v, positions, SCALE, None, variant=variant, block_n=16, split_tokens=16)
    torch.testing.assert_close(out.cpu().double(), reference(q.cpu(), k.cpu(), v.cpu(), positions.cpu(), SCALE, None),
                               atol=1e-5, rtol=1e-5)


def test_one_launch_leaves_its_counters_at_zero_for_the_next_launch():
    from atlas_fast.rollout.engine.decode_kernel import decode_attention_triton, tickets_for

    q, k, v, positions = inputs(2, 5, 6, 2, torch.float32, POSITIONS)
    tickets = torch.zeros(5 * 2, dtype=torch.int32, device=DEVICE)
    kw = dict(variant="one_launch", block_n=16, split_tokens=8, tickets=tickets)
    first = decode_attention_triton(q, k, v, positions, SCALE, None, **kw)
    assert (tickets == 0).all()
    second = decode_attention_triton(q, k, v, positions, SCALE, None, **kw)
    assert torch.equal(first, second)  # the merge runs in split order whoever draws the last ticket
    # New lengths on the same counters (the next decode step): still exact.
    moved = torch.tensor([1, 35, 36, 9, 24], device=DEVICE)
    third = decode_attention_triton(q, k, v, moved, SCALE, None, **kw)
    torch.testing.assert_close(third.cpu().double(), reference(q.cpu(), k.cpu(), v.cpu(), moved.cpu(), SCALE, None),
                               atol=1e-5, rtol=1e-5)
    assert (tickets == 0).all()
    # The default counters come from the module's cache, zero after use too.
    decode_attention_triton(q, k, v, positions, SCALE, None, variant="one_launch", block_n=16, split_tokens=8)
    shared = tickets_for(torch.device(DEVICE), 5, 2)
    assert shared is tickets_for(torch.device(DEVICE), 5, 2) and (shared == 0).all()


def test_variants_agree_and_knobs_do_not_change_the_answer():
    from atlas_fast.rollout.engine.decode_kernel import decode_attention_triton

    q, k, v, positions = inputs(3, 5, 6, 2, torch.float32, POSITIONS)
    ref = reference(q.cpu(), k.cpu(), v.cpu(), positions.cpu(), SCALE, None)
    for variant in ("two_kernel", "one_launch"):
        for block_n, programs_per_sm in ((16, 1), (32, 100)):  # one split; one per block
            out = decode_attention_triton(q, k, v, positions, SCALE, None, variant=variant, block_n=block_n,
                                          programs_per_sm=programs_per_sm, num_warps=2, num_stages=1)
            torch.testing.assert_close(out.cpu().double(), ref, atol=1e-5, rtol=1e-5)


def test_bad_knobs_are_named():
    from atlas_fast.rollout.engine.decode_kernel import decode_attention_triton

    q, k, v, positions = inputs(4, 2, 2, 1, torch.float32, [0, 3])
    with pytest.raises(ValueError, match="variant"):
        decode_attention_triton(q, k, v, positions, SCALE, None, variant="fused")
    with pytest.raises(ValueError, match="block_n"):
        decode_attention_triton(q, k, v, positions, SCALE, None, block_n=24)
    with pytest.raises(ValueError, match="tickets"):
        decode_attention_triton(q, k, v, positions, SCALE, None, variant="one_launch",
                                tickets=torch.zeros(1, dtype=torch.int32, device=DEVICE))
