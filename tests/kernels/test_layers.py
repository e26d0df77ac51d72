"""rms_norm and silu_mul (kernels/layers.py) against float64 references and against the HF modules
they stand in for: forward, gradients, odd sizes, bf16 and fp32, the dtype promotion.

Against the modules the interpreter allows one rounding step of difference: its float32 -> bf16
conversion and its rsqrt are not the GPU's. test_cuda.py checks the compiled kernels bit for bit."""
import pytest
import torch

from atlas_kernels import reference, rms_norm, silu_mul

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
