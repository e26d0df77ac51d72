import pytest
import torch

from atlas_kernels import kl_k3, reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_k3_matches_float64_with_gradients(gen, dtype):
    lp = (-torch.rand(5, 1031, generator=gen) * 5).to(dtype).requires_grad_()
    ref = (-torch.rand(5, 1031, generator=gen) * 5).to(dtype).requires_grad_()
    out = kl_k3(lp, ref)
    g = torch.randn(5, 1031, generator=gen)
    (out * g).sum().backward()
    lp64 = lp.detach().double().requires_grad_()
    ref64 = ref.detach().double().requires_grad_()
    expected = reference.kl_k3(lp64, ref64)
    (expected * g.double()).sum().backward()
    assert out.dtype == torch.float32 and (out >= 0).all()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(lp.grad.double(), lp64.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(ref.grad.double(), ref64.grad, atol=tol, rtol=tol)


def test_kl_k3_is_zero_at_equality_and_rejects_mismatch():
    x = -torch.rand(3, 7)
    assert torch.equal(kl_k3(x, x), torch.zeros(3, 7))
    with pytest.raises(ValueError, match="ref_logps shape"):
        kl_k3(x, x[:, :5])
