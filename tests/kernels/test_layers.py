"""rms_norm, silu_mul and rope (kernels/layers.py) against float64 references and against the HF
modules and functions they stand in for: forward, gradients, odd sizes, bf16 and fp32, the dtype
promotion.

Against the modules the interpreter allows one rounding step of difference: its float32 -> bf16
conversion and its rsqrt are not the GPU's. test_cuda.py checks the compiled kernels bit for bit."""
import pytest
import torch

from atlas_kernels import reference, rms_norm, rope, silu_mul

from .helpers import assert_close


def _rms_norm64(x, w, eps):
    x64 = x.double()
    return w.double() * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 101), (37, 64), (5, 1000)])
def test_rms_norm_matches_float64_with_gradients(gen, dtype, shape):
    H = shape[-1]
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(H, generator=gen)).to(dtype).requires_grad_()
    y = rms_norm(x, w, 1e-6)
    dy = torch.randn(*shape, generator=gen)
    (y.float() * dy).sum().backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = _rms_norm64(x64, w64, 1e-6)
    (y64 * dy.double()).sum().backward()
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y64, dtype)
    assert_close(x.grad, x64.grad, dtype, scale=2.0)
    # d(weight) sums over every row: its error grows with the row count
    assert_close(w.grad, w64.grad, dtype, scale=max(1.0, (x.numel() // H) ** 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_the_hf_module(gen, dtype):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    module = Qwen2RMSNorm(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        module.weight.copy_(1 + 0.2 * torch.randn(96, generator=gen))
    x = torch.randn(4, 9, 96, generator=gen).to(dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = rms_norm(xa, module.weight, module.variance_epsilon)
    theirs = module(xb)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -6  # two bf16 rounding steps (before and after the weight)
    torch.testing.assert_close(ours, theirs, atol=tol, rtol=tol)
    dy = torch.randn(4, 9, 96, generator=gen).to(dtype)
    ours.backward(dy)
    theirs.backward(dy)
    atol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(xa.grad, xb.grad, atol=atol, rtol=atol)


def test_rms_norm_promotes_like_the_module_and_rejects_bad_shapes(gen):
    x = torch.randn(6, 32, generator=gen).to(torch.bfloat16)
    w = torch.ones(32)  # an fp32 weight under autocast: the module returns fp32
    y = rms_norm(x, w, 1e-6)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, reference.rms_norm(x, w, 1e-6), atol=2 ** -7, rtol=2 ** -7)
    with pytest.raises(ValueError, match="does not match the last dimension"):
        rms_norm(x, torch.ones(31), 1e-6)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        rms_norm(x, w, -1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 129), (2053,)])
def test_silu_mul_matches_float64_with_gradients(gen, dtype, shape):
    g = (torch.randn(*shape, generator=gen) * 4).to(dtype).requires_grad_()
    u = torch.randn(*shape, generator=gen).to(dtype).requires_grad_()
    y = silu_mul(g, u)
    dy = torch.randn(*shape, generator=gen)
    (y.float() * dy).sum().backward()
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    y64 = torch.nn.functional.silu(g64) * u64
    (y64 * dy.double()).sum().backward()
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert_close(y, y64, dtype)
    assert_close(g.grad, g64.grad, dtype, scale=2.0)
    assert_close(u.grad, u64.grad, dtype)


def test_silu_mul_follows_the_modules_arithmetic(gen):
    g = (torch.randn(5, 77, generator=gen) * 4).to(torch.bfloat16)
    u = torch.randn(5, 77, generator=gen).to(torch.bfloat16)
    # silu rounded before the product, as the module does: two bf16 roundings at most apart
    torch.testing.assert_close(silu_mul(g, u), torch.nn.functional.silu(g) * u, atol=2 ** -6, rtol=2 ** -6)
    with pytest.raises(ValueError, match="must have one shape"):
        silu_mul(g, u[:, :76])


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope_bound(x, cos, sin, u):
    """What rounding may move an output of rope: the two products and their sum rounded, each by
    at most 2u relative (u the unit roundoff; the interpreter truncates to bf16 where the GPU
    rounds to nearest), in float64. rotate_half's signs do not matter to the magnitudes, so the
    same bound holds for the backward, whose sin is rotate_half(sin)."""
    x, c, s = x.detach().double().abs(), cos.double().abs().unsqueeze(1), sin.double().abs().unsqueeze(1)
    return 4 * u * (x * c + _rotate_half(x).abs() * torch.maximum(s, _rotate_half(s).abs())) + 1e-30


def _assert_rope_close(actual, expected, bound):
    actual = actual.detach().double()
    assert torch.isfinite(actual).all(), "non-finite values"
    err = (actual - expected.detach().double()).abs()
    assert (err <= bound).all(), f"max error {err.max().item():.3g}, over its bound by {(err / bound).max().item():.3g}x"


def _heads(gen, B, T, H, D, dtype):
    """[B, H, T, D] as the attention modules make it: a transposed view of a [B, T, H, D] projection."""
    return (torch.randn(B, T, H, D, generator=gen) * 2).to(dtype).transpose(1, 2)


UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, T, Hq, Hkv, D, shared", [(2, 7, 6, 2, 64, False), (1, 13, 3, 3, 128, True),
                                                      (3, 5, 7, 1, 80, False), (2, 1, 20, 4, 16, True)])
def test_rope_matches_float64_with_gradients(gen, dtype, B, T, Hq, Hkv, D, shared):
    """GQA head counts, odd token and head counts, head dims 64, 128 and two that are not powers of
    two per half (80: 40; 16 with 20 heads: more heads than one tile), cos/sin per sequence or shared
    by the batch. cos and sin come from independent angles for each of the D columns, so a kernel
    that read one half of them twice (HF duplicates the halves) would fail."""
    q = _heads(gen, B, T, Hq, D, dtype).requires_grad_()
    k = _heads(gen, B, T, Hkv, D, dtype).requires_grad_()
    angles = torch.rand(1 if shared else B, T, D, generator=gen) * 12.0
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    qo, ko = rope(q, k, cos, sin)
    dqo = torch.randn(qo.shape, generator=gen).to(dtype)
    dko = torch.randn(ko.shape, generator=gen).to(dtype)
    torch.autograd.backward([qo, ko], [dqo, dko])
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    rq, rk = reference.rope(q64, k64, cos.double(), sin.double())
    torch.autograd.backward([rq, rk], [dqo.double(), dko.double()])
    assert qo.dtype == ko.dtype == dtype and qo.shape == q.shape and ko.shape == k.shape
    assert qo.stride() == q.stride() and q.grad.stride() == q.stride()  # [B, T, H, D] memory order kept
    u = UNIT_ROUNDOFF[dtype]
    _assert_rope_close(qo, rq, _rope_bound(q, cos, sin, u))
    _assert_rope_close(ko, rk, _rope_bound(k, cos, sin, u))
    _assert_rope_close(q.grad, q64.grad, _rope_bound(dqo, cos, sin, u))
    _assert_rope_close(k.grad, k64.grad, _rope_bound(dko, cos, sin, u))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_equals_hf_apply_rotary_pos_emb(gen, dtype):
    """Against transformers' own function with a Qwen2 rotary embedding's cos/sin, positions
    restarting per packed sequence (the padding-free batch): float32 equal to a few ulps, bf16
    within the products' and the sum's rounding (the interpreter truncates where PyTorch rounds;
    test_cuda.py checks the compiled kernel bit for bit)."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb

    cfg = Qwen2Config(hidden_size=96, num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=64)
    position_ids = torch.cat([torch.arange(n) for n in (5, 9, 3)])[None]  # three sequences in one row
    x = torch.randn(1, 17, 96, generator=gen).to(dtype)
    cos, sin = Qwen2RotaryEmbedding(cfg)(x, position_ids)
    assert cos.dtype == dtype and cos.shape == (1, 17, 32)
    q, k = _heads(gen, 1, 17, 3, 32, dtype), _heads(gen, 1, 17, 1, 32, dtype)
    qa, ka = q.clone().requires_grad_(), k.clone().requires_grad_()
    qb, kb = q.clone().requires_grad_(), k.clone().requires_grad_()
    ours, theirs = rope(qa, ka, cos, sin), apply_rotary_pos_emb(qb, kb, cos, sin)
    dq, dk = torch.randn(q.shape, generator=gen).to(dtype), torch.randn(k.shape, generator=gen).to(dtype)
    torch.autograd.backward(ours, [dq, dk])
    torch.autograd.backward(theirs, [dq, dk])
    u = UNIT_ROUNDOFF[dtype]
    for a, b, bound in [(ours[0], theirs[0], _rope_bound(q, cos, sin, u)), (ours[1], theirs[1], _rope_bound(k, cos, sin, u)),
                        (qa.grad, qb.grad, _rope_bound(dq, cos, sin, u)), (ka.grad, kb.grad, _rope_bound(dk, cos, sin, u))]:
        assert a.dtype == b.dtype and a.shape == b.shape
        _assert_rope_close(a, b, 2 * bound)  # each side rounds


def test_rope_promotes_like_pytorch_and_keeps_nan_where_it_was(gen):
    """float32 cos/sin with bf16 queries (an autocast model's rotary embedding follows the fp32
    hidden states) give float32 outputs and bf16 gradients, as the eager formula does; a NaN reaches
    the two outputs that read it, and only those, and is never hidden."""
    q = _heads(gen, 2, 5, 4, 32, torch.bfloat16).requires_grad_()
    k = _heads(gen, 2, 5, 2, 32, torch.bfloat16).requires_grad_()
    angles = torch.rand(2, 5, 32, generator=gen) * 6
    cos, sin = angles.cos(), angles.sin()
    qo, ko = rope(q, k, cos, sin)
    rq, rk = reference.rope(q.detach(), k.detach(), cos, sin)
    assert qo.dtype == ko.dtype == torch.float32
    torch.testing.assert_close(qo, rq, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ko, rk, atol=1e-6, rtol=1e-6)
    (qo.sum() + ko.sum()).backward()
    assert q.grad.dtype == k.grad.dtype == torch.bfloat16
    bad = q.detach().clone()
    bad[1, 2, 3, 7] = float("nan")
    out, _ = rope(bad, k.detach(), cos, sin)
    expected = torch.zeros(out.shape, dtype=torch.bool)
    expected[1, 2, 3, [7, 7 + 16]] = True  # column j of either half reads column j of both
    assert torch.equal(torch.isnan(out), expected)


def test_rope_rejects_what_it_cannot_compute(gen):
    q, k = torch.randn(2, 4, 5, 16, generator=gen), torch.randn(2, 2, 5, 16, generator=gen)
    cos, sin = torch.randn(2, 5, 16, generator=gen), torch.randn(2, 5, 16, generator=gen)
    with pytest.raises(ValueError, match="must be even"):
        rope(q[..., :15], k[..., :15], cos[..., :15], sin[..., :15])
    with pytest.raises(ValueError, match="must share q's"):
        rope(q, k[:, :, :4], cos, sin)
    with pytest.raises(ValueError, match=r"must both be \[2 or 1, 5, 16\]"):
        rope(q, k, cos[:, :4], sin[:, :4])
    with pytest.raises(ValueError, match=r"\[batch, heads, tokens, head_dim\]"):
        rope(q[0], k[0], cos, sin)
    with pytest.raises(ValueError, match="must not require grad"):
        rope(q, k, cos.requires_grad_(), sin)




_ROPE_PTX_OPS = """
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from atlas_kernels.layers import ROPE_OPTIONS, _rope_kernel

ints = ["T", "Hq", "Hkv", "HALF", "cos_sb", "sqb", "sqh", "sqt", "sqd", "skb", "skh", "skt", "skd",
        "sob", "soh", "sot", "sod", "spb", "sph", "spt", "spd"]
ops = {}
for dtype in ("bf16", "fp16"):
    for backward in (False, True):
        constexprs = {"BACKWARD": backward, "BLOCK_H": 16, "BLOCK_D": 64}
        signature = {**{n: "*" + dtype for n in ("q_ptr", "k_ptr", "qo_ptr", "ko_ptr", "cos_ptr", "sin_ptr")},
                     **{n: "i32" for n in ints}, **{n: "constexpr" for n in constexprs}}
        compiled = triton.compile(ASTSource(fn=_rope_kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options=dict(ROPE_OPTIONS))
        ops[f"{dtype} backward={backward}"] = re.findall(r"\\b((?:fma|mul|add|sub)\\.[a-z0-9.]+)", compiled.asm["ptx"])
print(json.dumps(ops))
"""


def test_rope_compiles_without_fused_multiply_adds():
    """PyTorch computes a rounded product, then a rounded sum: a fused multiply-add skips the first
    rounding (1 ulp off on ~22% of bf16 outputs). Compiled for sm_90 with the launch options (no
    GPU needed; outside the interpreter), the kernel keeps separate, rounded 16-bit multiplies and
    adds, forward and backward."""
    import json
    import os
    import subprocess
    import sys

    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _ROPE_PTX_OPS], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for build, ops in json.loads(done.stdout.strip().splitlines()[-1]).items():
        width = "bf16" if build.startswith("bf16") else "f16"
        assert not [op for op in ops if op.startswith("fma")], (build, ops)
        assert f"mul.rn.{width}" in ops, (build, ops)
        assert {f"add.rn.{width}", f"sub.rn.{width}"} & set(ops), (build, ops)


def test_rope_launches_with_its_options(gen, monkeypatch):
    """The kernel as launched, not only as compiled in the test above, gets ROPE_OPTIONS."""
    from atlas_kernels import layers

    seen = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs)
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(layers, "_rope_kernel", Recorder(layers._rope_kernel))
    q = torch.randn(1, 3, 5, 8, generator=gen).requires_grad_()
    k = torch.randn(1, 1, 5, 8, generator=gen).requires_grad_()
    cos, sin = torch.randn(1, 5, 8, generator=gen), torch.randn(1, 5, 8, generator=gen)
    qe, ke = rope(q, k, cos, sin)
    (qe.sum() + ke.sum()).backward()
    assert len(seen) == 2  # forward and backward
    assert all(kwargs.items() >= layers.ROPE_OPTIONS.items() for kwargs in seen)
