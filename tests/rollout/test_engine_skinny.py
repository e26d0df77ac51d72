"""The decode step's skinny GEMM kernels (engine/skinny.py) against the cuBLAS-path ops they replace
(F.linear, rope_store, silu_mul), float64 references, through the Triton interpreter on CPU."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from atlas_fast.rollout.engine.attention import RopeTable, apply_rope

from .engine_models import one_thread  # noqa: F401 (an autouse fixture)

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs CUDA or the Triton interpreter")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("M", [1, 5, 70])  # one row, a padded block, two row blocks
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_float64(M, bias):
    from atlas_fast.rollout.engine.skinny import linear

    g = _gen(10 + M)
    K, N = 100, 45  # neither a multiple of the blocks
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / 10
    b = torch.randn(N, generator=g) if bias else None
    got = linear(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE) if bias else None, config=(16, 32, 4, 2))
    want = F.linear(x.double(), w.double(), b.double() if bias else None)
    assert got.shape == (M, N) and torch.isfinite(got).all()
    torch.testing.assert_close(got.double().cpu(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("M", [3, 70])  # 70: two blocks of rows
def test_gate_up_silu_matches_float64(M):
    from atlas_fast.rollout.engine.skinny import gate_up_silu

    g = _gen(20 + M)
    K, I = 72, 50
    x, w = torch.randn(M, K, generator=g), torch.randn(2 * I, K, generator=g) / 5
    got = gate_up_silu(x.to(DEVICE), w.to(DEVICE), config=(16, 32, 4, 2))
    gate, up = F.linear(x.double(), w.double()).chunk(2, -1)
    torch.testing.assert_close(got.double().cpu(), F.silu(gate) * up, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(DEVICE != "cuda", reason="the Triton interpreter's tl.dot reads bfloat16 operands as raw bits")
def test_gate_up_silu_rounds_like_the_bf16_module():
    """In bf16 the projection outputs, the activation and the product are each rounded, as HF's
    modules round them; the fused kernel must give the module's value, not a more exact one."""
    from atlas_fast.rollout.engine.skinny import gate_up_silu

    g = _gen(3)
    M, K, I = 4, 32, 32
    x = torch.randn(M, K, generator=g).bfloat16()
    w = (torch.randn(2 * I, K, generator=g) / 4).bfloat16()
    got = gate_up_silu(x.to(DEVICE), w.to(DEVICE), config=(16, 32, 4, 2)).cpu()
    gate, up = F.linear(x.float(), w.float()).bfloat16().chunk(2, -1)  # fp32 accumulation, one rounding each
    want = (F.silu(gate.float()).bfloat16().float() * up.float()).bfloat16()
    assert got.dtype == torch.bfloat16
    # Accumulation order may move a projection by one bf16 ulp; the roundings must be HF's.
    torch.testing.assert_close(got.float(), want.float(), atol=0.0, rtol=2 ** -7)


def _rope(S: int, D: int) -> RopeTable:
    freqs = torch.arange(S)[:, None] * (1.0 / 10000 ** (torch.arange(0, D, 2) / D))[None]
    emb = torch.cat([freqs, freqs], -1)
    return RopeTable.build(emb.cos(), emb.sin())


@pytest.mark.parametrize("qk_norm,bias,pairs,M", [(False, False, 0, 5), (False, True, 16, 5), (True, True, 16, 5),
                                                  (True, False, 0, 5), (False, True, 16, 67)])
def test_qkv_rope_store_matches_projection_rope_and_cache_write(qk_norm, bias, pairs, M):
    """pairs 16 splits each head of 64 over two programs; Qwen3's q/k norm needs the whole head;
    67 rows take two blocks of rows."""
    from atlas_fast.rollout.engine.skinny import qkv_rope_store

    g = _gen(30 + 2 * qk_norm + bias + M)
    K, HQ, HKV, D, S = 40, 6, 2, 64, 19
    N = (HQ + 2 * HKV) * D
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / 6
    b = torch.randn(N, generator=g) if bias else None
    positions = torch.tensor([0, 7, 18, 3, 11] * (M // 5) + [5] * (M % 5))
    rope = _rope(S, D)
    norms = None
    if qk_norm:
        norms = (torch.rand(D, generator=g) + 0.5, torch.rand(D, generator=g) + 0.5, 1e-6)
    kc = torch.zeros(M + 1, HKV, S, D, device=DEVICE)
    vc = torch.zeros(M + 1, HKV, S, D, device=DEVICE)
    q = qkv_rope_store(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE) if bias else None, positions.to(DEVICE),
                       rope.cos.to(DEVICE), rope.sin_signed.to(DEVICE), kc, vc, HQ,
                       tuple(t.to(DEVICE) if torch.is_tensor(t) else t for t in norms) if norms else None,
                       config=(pairs, 16, 4, 2))
    kc, vc = kc.cpu(), vc.cpu()
    proj = F.linear(x.double(), w.double(), b.double() if bias else None)
    q_ref, k_ref, v_ref = proj.split([HQ * D, HKV * D, HKV * D], -1)
    q_ref, k_ref, v_ref = q_ref.view(M, HQ, D), k_ref.view(M, HKV, D), v_ref.view(M, HKV, D)
    if qk_norm:
        def norm(t, weight):
            return weight.double() * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6))
        q_ref, k_ref = norm(q_ref, norms[0]), norm(k_ref, norms[1])
    cos, sin = rope.lookup(positions[:, None])
    cos, sin = cos[:, :, None].double(), sin[:, :, None].double()
    q_ref = apply_rope(q_ref[:, None], cos, sin)[:, 0]
    k_ref = apply_rope(k_ref[:, None], cos, sin)[:, 0]
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.double().cpu(), q_ref, atol=1e-4, rtol=1e-4)
    written = torch.zeros(M + 1, S, dtype=torch.bool)
    for m, p in enumerate(positions.tolist()):
        torch.testing.assert_close(kc[m, :, p].double(), k_ref[m], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(vc[m, :, p].double(), v_ref[m], atol=1e-4, rtol=1e-4)
        written[m, p] = True
    assert (kc.abs().sum((1, 3)) > 0).eq(written).all()  # nothing else in the cache was touched
    assert (vc.abs().sum((1, 3)) > 0).eq(written).all()


@pytest.mark.parametrize("split_k", [2, 3])
def test_split_k_partials_summed_by_the_next_norm(split_k):
    """down_proj's split-K partial sums, added in order by the next add_rms_norm, equal the residual
    add of the whole projection."""
    from atlas_fast.rollout.engine.kernels import add_rms_norm
    from atlas_fast.rollout.engine.skinny import linear

    g = _gen(50 + split_k)
    M, K, N = 7, 200, 40
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / 10
    parts = linear(x.to(DEVICE), w.to(DEVICE), config=(16, 32, 4, 2), split_k=split_k)
    assert parts.shape == (split_k, M, N) and parts.dtype == torch.float32
    want = F.linear(x.double(), w.double())
    torch.testing.assert_close(parts.sum(0).double().cpu(), want, atol=1e-4, rtol=1e-4)
    resid = torch.randn(M, N, generator=g)
    weight = torch.rand(N, generator=g) + 0.5
    x_split, x_whole = resid.clone().to(DEVICE), resid.clone().to(DEVICE)
    got = add_rms_norm(x_split, parts, weight.to(DEVICE), 1e-6)
    ref = add_rms_norm(x_whole, want.float().to(DEVICE), weight.to(DEVICE), 1e-6)
    torch.testing.assert_close(x_split, x_whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_rows_per_program_setting_changes_nothing_but_the_grid():
    """A config's fifth entry (rows per program) splits the batch over more programs."""
    from atlas_fast.rollout.engine.skinny import gate_up_silu, linear

    g = _gen(60)
    x = torch.randn(40, 64, generator=g).to(DEVICE)
    w = (torch.randn(24, 64, generator=g) / 8).to(DEVICE)
    wg = (torch.randn(48, 64, generator=g) / 8).to(DEVICE)
    few, all_rows = (16, 32, 4, 2, 16), (16, 32, 4, 2)
    torch.testing.assert_close(linear(x, w, config=few), linear(x, w, config=all_rows), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gate_up_silu(x, wg, config=few), gate_up_silu(x, wg, config=all_rows), atol=1e-6, rtol=1e-6)
