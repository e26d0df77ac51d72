"""The engine's Triton decode kernels against the PyTorch ops they replace, through the Triton
interpreter on CPU (tests/conftest.py turns it on without CUDA), float32, odd sizes."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from atlas_fast.rollout.engine.attention import RopeTable, apply_rope, decode_attention, decode_mask

from .engine_models import one_thread  # noqa: F401 (an autouse fixture)

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs CUDA or the Triton interpreter")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("heads", [(6, 2), (3, 3)])  # G = 3 (padded to 16 rows in the dot), and no GQA
def test_decode_attention_reads_each_rows_own_length(window, heads):
    from atlas_fast.rollout.engine import decode_kernel
    from atlas_fast.rollout.engine.decode_kernel import decode_attention_triton

    g = torch.Generator().manual_seed(0)
    HQ, HKV = heads
    B, rows, S, D = 3, 4, 45, 16
    q = torch.randn(B, HQ, D, generator=g).to(DEVICE)
    k = torch.randn(rows, HKV, S, D, generator=g).to(DEVICE)
    v = torch.randn(rows, HKV, S, D, generator=g).to(DEVICE)
    positions = torch.tensor([0, 20, 44]).to(DEVICE)  # one key only; mid; the whole cache
    old = decode_kernel.SPLIT_TOKENS
    decode_kernel.SPLIT_TOKENS = 16  # three splits, some empty for the short rows
    try:
        out = decode_attention_triton(q, k, v, positions, 0.3, window)
    finally:
        decode_kernel.SPLIT_TOKENS = old
    mask = decode_mask(positions, S, window, torch.float32)
    ref = decode_attention(q, k[:B], v[:B], mask, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    k_poisoned = k.clone()
    k_poisoned[0, :, 1:] = float("nan")  # row 0 must never read past its one key
    out0 = decode_attention_triton(q, k_poisoned, v, positions, 0.3, window)
    assert torch.isfinite(out0).all()


@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_store_matches_rope_then_cache_write(qk_norm):
    from atlas_fast.rollout.engine.kernels import rope_store

    g = torch.Generator().manual_seed(1)
    B, HQ, HKV, D, S = 3, 4, 2, 16, 10
    q, k, v = (torch.randn(B, h, D, generator=g).to(DEVICE) for h in (HQ, HKV, HKV))
    positions = torch.tensor([0, 4, 9]).to(DEVICE)
    freqs = torch.arange(S)[:, None] * (1.0 / 10000 ** (torch.arange(0, D, 2) / D))[None]
    emb = torch.cat([freqs, freqs], -1)
    rope = RopeTable.build(emb.cos().to(DEVICE), emb.sin().to(DEVICE))
    kc, vc = torch.zeros(B + 1, HKV, S, D, device=DEVICE), torch.zeros(B + 1, HKV, S, D, device=DEVICE)
    weights = None
    if qk_norm:
        qw, kw = (torch.rand(D, generator=g) + 0.5).to(DEVICE), (torch.rand(D, generator=g) + 0.5).to(DEVICE)
        weights = (qw, kw, 1e-6)

        def norm(x, w):
            return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

        q_ref, k_ref = norm(q, qw), norm(k, kw)
    else:
        q_ref, k_ref = q, k
    cos, sin = rope.lookup(positions[:, None])  # [B, 1, D]
    q_ref = apply_rope(q_ref[:, None], cos[:, :, None], sin[:, :, None])[:, 0]
    k_ref = apply_rope(k_ref[:, None], cos[:, :, None], sin[:, :, None])[:, 0]
    qkv = torch.cat([q.reshape(B, -1), k.reshape(B, -1), v.reshape(B, -1)], 1)  # strided rows, as a packed projection gives
    qs, ks, vs = qkv.split([HQ * D, HKV * D, HKV * D], 1)
    out_q = rope_store(qs, ks, vs, positions, rope.cos, rope.sin_signed, kc, vc, weights)
    torch.testing.assert_close(out_q, q_ref, atol=1e-5, rtol=1e-5)
    for b, p in enumerate(positions.tolist()):
        torch.testing.assert_close(kc[b, :, p], k_ref[b], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vc[b, :, p], v[b])
    written = torch.zeros(B + 1, S, dtype=torch.bool, device=DEVICE)
    written[torch.arange(B, device=DEVICE), positions] = True
    assert (kc.abs().sum((1, 3)) > 0).eq(written).all()  # nothing else was touched


@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rms_norm_matches_the_hf_module(with_delta):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from atlas_fast.rollout.engine.kernels import add_rms_norm

    g = torch.Generator().manual_seed(2)
    N = 40  # not a power of two
    norm = Qwen2RMSNorm(N, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(N, generator=g) + 0.5)
    x, delta = torch.randn(5, N, generator=g).to(DEVICE), torch.randn(5, N, generator=g).to(DEVICE)
    want_x = x + delta if with_delta else x
    with torch.no_grad():
        want = norm(want_x)
    got_x = x.clone()
    got = add_rms_norm(got_x, delta if with_delta else None, norm.weight.detach(), norm.variance_epsilon)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_x, want_x)


def test_silu_mul_matches_hf_mlp_activation():
    from atlas_fast.rollout.engine.kernels import silu_mul

    g = torch.Generator().manual_seed(3)
    gate_up = torch.randn(4, 2 * 1500, generator=g).to(DEVICE)  # N not a multiple of the block
    gate, up = gate_up.chunk(2, -1)
    torch.testing.assert_close(silu_mul(gate_up), F.silu(gate) * up, atol=1e-5, rtol=1e-5)
