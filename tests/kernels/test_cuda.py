"""The compiled kernels on a real GPU, at production shapes, against float64 references.

Skipped without CUDA (CI has none); run on a GPU machine with TRITON_INTERPRET=0.
"""
import os

import pytest
import torch

from atlas_kernels import group_advantages, grpo_loss, grpo_loss_from_logits, kl_k3, reference, selective_logprobs

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", reason="needs a CUDA GPU, compiled"
)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("V", [151936, 32000, 4099])
def test_selective_logprobs_cuda(dtype, V):
    g = torch.Generator(device="cuda").manual_seed(V)
    full = (torch.randn(4, 257, V, device="cuda", generator=g) * 3).to(dtype).requires_grad_()
    index = torch.randint(0, V, (4, 256), device="cuda", generator=g)
    logp, ent = selective_logprobs(full[:, :-1], index, temperature=0.9, return_entropy=True)
    (logp.sum() + 0.5 * ent.sum()).backward()
    ref_in = full.detach().double().requires_grad_()
    rlogp, rent = reference.selective_logprobs(ref_in[:, :-1], index, temperature=0.9, return_entropy=True)
    (rlogp.sum() + 0.5 * rent.sum()).backward()
    assert (logp <= 0).all()
    torch.testing.assert_close(logp.double(), rlogp, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(ent.double(), rent, atol=2e-4, rtol=1e-5)
    err = (full.grad.double() - ref_in.grad).abs().max().item()
    assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5) * ref_in.grad.abs().max().item() + 1e-7


@pytest.mark.parametrize("loss_type, level", [("grpo", "token"), ("dapo", "sequence"), ("cispo", "token"), ("dr_grpo", "token")])
def test_grpo_loss_from_logits_cuda(loss_type, level):
    g = torch.Generator(device="cuda").manual_seed(1)
    B, T, V = 8, 300, 151936
    logits = (torch.randn(B, T, V, device="cuda", generator=g) * 2).to(torch.bfloat16)
    index = torch.randint(0, V, (B, T), device="cuda", generator=g)
    base = reference.selective_logprobs(logits, index).float()
    old = base + 0.1 * torch.randn(B, T, device="cuda", generator=g)
    ref = base + 0.2 * torch.randn(B, T, device="cuda", generator=g)
    adv = torch.randn(B, device="cuda", generator=g)
    mask = torch.arange(T, device="cuda")[None] < torch.randint(1, T, (B, 1), device="cuda", generator=g)
    opts = dict(beta=0.04, loss_type=loss_type, importance_sampling_level=level, epsilon_high=0.28)
    leaf = logits.clone().requires_grad_()
    loss, stats = grpo_loss_from_logits(leaf * 1, index, old, ref, adv, mask, **opts)
    loss.backward()
    r_leaf = logits.double().requires_grad_()
    rloss, rstats = reference.grpo_loss_from_logits(r_leaf, index, old.double(), ref.double(), adv.double(), mask, **opts)
    rloss.backward()
    torch.testing.assert_close(loss.double(), rloss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stats["kl"].double(), rstats["kl"], atol=1e-5, rtol=1e-4)
    scale = r_leaf.grad.abs().max().item()
    assert (leaf.grad.double() - r_leaf.grad).abs().max().item() < 1e-2 * scale


def test_small_ops_cuda():
    g = torch.Generator(device="cuda").manual_seed(2)
    r = torch.randn(1024, device="cuda", generator=g)
    r[::7] = float("nan")
    for scale in ("group", "batch", "none"):
        adv, mean, std = group_advantages(r, 8, scale=scale)
        radv, rmean, rstd = reference.group_advantages(r.double(), 8, scale=scale)
        torch.testing.assert_close(adv.double(), radv, atol=1e-4, rtol=1e-4)
    lp = -torch.rand(64, 4096, device="cuda", generator=g)
    old = lp + 0.1 * torch.randn_like(lp)
    mask = torch.rand(64, 4096, device="cuda", generator=g) > 0.2
    adv = torch.randn(64, device="cuda", generator=g)
    loss, _ = grpo_loss(lp.requires_grad_(), old, old, adv, mask, beta=0.04, loss_type="bnpo")
    rloss, _ = reference.grpo_loss(lp.double(), old.double(), old.double(), adv.double(), mask, beta=0.04, loss_type="bnpo")
    torch.testing.assert_close(loss.double(), rloss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(kl_k3(lp, old).double(), reference.kl_k3(lp.double(), old.double()), atol=1e-6, rtol=1e-5)
