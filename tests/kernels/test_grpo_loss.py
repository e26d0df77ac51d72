import itertools

import pytest
import torch

from atlas_kernels import grpo_loss, grpo_loss_from_logits, reference
from atlas_kernels.grpo import GRPOLoss

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo"]


def make_batch(B, T, gen, *, empty_row=True):
    logps = -torch.rand(B, T, generator=gen) * 4
    old = logps + torch.randn(B, T, generator=gen) * 0.3  # ratios well outside [0.8, 1.2] too
    ref = logps + torch.randn(B, T, generator=gen) * 0.5
    adv = torch.randn(B, generator=gen)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if empty_row:
        mask[B // 2] = False
    # padding positions hold junk that must not leak into anything
    logps = torch.where(mask, logps, torch.full_like(logps, -1e30))
    return logps, old, ref, adv, mask


def run(fn, logps, old, ref, adv, mask, dtype, **opts):
    leaf = logps.detach().to(dtype).clone().requires_grad_()
    loss, stats = fn(leaf, None if old is None else old.to(dtype), None if ref is None else ref.to(dtype),
                     adv.to(dtype), mask, **opts)
    loss.backward()
    return loss, stats, leaf.grad


CASES = list(itertools.product(LOSS_TYPES, ["token", "sequence"], [0.0, 0.04], [True, False]))
CASES += [(lt, level, 0.04, off, True) for lt in ("grpo", "dapo") for level in ("token", "sequence")
          for off in (True, False)]
CASES = [c if len(c) == 5 else c + (False,) for c in CASES]


@pytest.mark.parametrize("loss_type, level, beta, off_policy, kl_is", CASES)
def test_matches_float64_reference(loss_type, level, beta, off_policy, kl_is):
    gen = torch.Generator().manual_seed(hash((loss_type, level, beta, off_policy, kl_is)) % 2**31)
    logps, old, ref, adv, mask = make_batch(7, 37, gen)
    old = old if off_policy else None
    ref = ref if beta > 0 or off_policy else None
    opts = dict(beta=beta, loss_type=loss_type, importance_sampling_level=level, epsilon_high=0.28,
                max_completion_length=40, use_bias_correction_kl=kl_is)
    if loss_type == "cispo":
        opts["epsilon_high"] = 3.0
    loss, stats, grad = run(grpo_loss, logps, old, ref, adv, mask, torch.float32, **opts)
    rloss, rstats, rgrad = run(reference.grpo_loss, logps, old, ref, adv, mask, torch.float64, **opts)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), rloss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), rgrad, atol=1e-6, rtol=1e-5)
    assert stats.keys() == rstats.keys()
    for k in stats:
        torch.testing.assert_close(stats[k].double(), rstats[k], atol=1e-6, rtol=1e-5)
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    gen = torch.Generator().manual_seed(5)
    logps, old, ref, adv, mask = make_batch(5, 29, gen)
    logps = logps.clamp(min=-20)
    opts = dict(beta=0.04, loss_type="dapo")
    loss, _, grad = run(grpo_loss, logps, old, ref, adv, mask, dtype, **opts)
    # the reference sees the same rounded inputs, in float64
    rloss, _, rgrad = run(reference.grpo_loss, logps.to(dtype).double(), old.to(dtype).double(),
                          ref.to(dtype).double(), adv.to(dtype).double(), mask, torch.float64, **opts)
    assert grad.dtype == dtype
    torch.testing.assert_close(loss.double(), rloss, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad.double(), rgrad, atol=1e-3, rtol=1e-2)


def test_delta_two_sided_clip():
    gen = torch.Generator().manual_seed(6)
    logps, old, ref, adv, mask = make_batch(6, 21, gen)
    old = logps - 1.0  # ratio e ~ 2.7 everywhere: delta decides the positive-advantage rows
    opts = dict(delta=1.5, loss_type="bnpo")
    loss, _, grad = run(grpo_loss, logps, old, None, adv, mask, torch.float32, **opts)
    rloss, _, rgrad = run(reference.grpo_loss, logps, old, None, adv, mask, torch.float64, **opts)
    torch.testing.assert_close(loss.double(), rloss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), rgrad, atol=1e-6, rtol=1e-5)


def test_num_items_overrides_token_normaliser():
    gen = torch.Generator().manual_seed(7)
    logps, old, ref, adv, mask = make_batch(4, 9, gen, empty_row=False)
    a, _ = grpo_loss(logps, old, None, adv, mask, loss_type="dapo")
    b, _ = grpo_loss(logps, old, None, adv, mask, loss_type="dapo", num_items=mask.sum() * 2)
    torch.testing.assert_close(a, 2 * b)


def test_on_policy_grpo_gradient_is_minus_advantage_over_length():
    logps = -torch.rand(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0])
    leaf = logps.clone().requires_grad_()
    loss, stats = grpo_loss(leaf, None, None, adv, mask)
    loss.backward()
    expected = torch.tensor([[-1 / 3] * 3 + [0.0], [1.0, 1.0, 0.0, 0.0]]) / 2  # -A / n_tokens / B
    torch.testing.assert_close(leaf.grad, expected)
    torch.testing.assert_close(loss, -adv.mean())
    assert stats["clip_ratio/region_mean"] == 0 and "kl" not in stats


def test_uses_the_triton_kernel(monkeypatch):
    called = []
    original = GRPOLoss.apply
    monkeypatch.setattr(GRPOLoss, "apply", lambda *a: called.append(1) or original(*a))
    gen = torch.Generator().manual_seed(8)
    logps, old, ref, adv, mask = make_batch(3, 5, gen)
    grpo_loss(logps, old, ref, adv, mask, beta=0.1)
    assert called


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type, level", [("grpo", "token"), ("dapo", "sequence"), ("cispo", "token")])
def test_from_logits_matches_reference_and_is_in_place(dtype, loss_type, level):
    gen = torch.Generator().manual_seed(9)
    B, T, V = 3, 7, 1031
    base = (torch.randn(B, T + 1, V, generator=gen) * 3).to(dtype)
    index = torch.randint(0, V, (B, T), generator=gen)
    with torch.no_grad():
        lp0 = reference.selective_logprobs(base[:, :-1].double(), index, temperature=0.8).float()
    _, old, ref, adv, mask = make_batch(B, T, gen)
    old, ref = lp0 + (old - old.mean()) * 0.1, lp0 + 0.2
    opts = dict(temperature=0.8, beta=0.04, loss_type=loss_type, importance_sampling_level=level, epsilon_high=0.28,
                return_entropy=True)

    leaf = base.clone().requires_grad_()
    logits = leaf * 1
    loss, stats = grpo_loss_from_logits(logits[:, :-1], index, old, ref, adv, mask, **opts)
    loss.backward()
    ptr = logits.data_ptr()

    r_leaf = base.double().requires_grad_()
    rloss, rstats = reference.grpo_loss_from_logits(r_leaf[:, :-1], index, old.double(), ref.double(),
                                                    adv.double(), mask, **opts)
    rloss.backward()
    torch.testing.assert_close(loss.double(), rloss, atol=1e-4, rtol=1e-4)
    tol = 1e-6 if dtype == torch.float32 else 5e-3
    torch.testing.assert_close(leaf.grad.double(), r_leaf.grad, atol=tol, rtol=1e-2)
    torch.testing.assert_close(stats["kl"].double(), rstats["kl"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stats["entropy"].double(), rstats["entropy"], atol=1e-4, rtol=1e-5)
    assert stats["entropy"] > 0 and not stats["entropy"].requires_grad
    assert logits.data_ptr() == ptr  # gradient written into the logits buffer
    assert (leaf.grad[~torch.cat([mask, torch.zeros(B, 1, dtype=torch.bool)], 1)] == 0).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(beta=0.1), "needs ref_logps"),
        (dict(loss_type="ppo"), "loss_type must be one of"),
        (dict(importance_sampling_level="batch"), "importance_sampling_level"),
        (dict(delta=0.5), "delta must be > 1"),
    ],
)
def test_bad_options(kwargs, match):
    logps, mask = -torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        grpo_loss(logps, None, None, torch.zeros(2), mask, **kwargs)


def test_bad_shapes_name_the_argument():
    logps, mask = -torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="old_logps shape"):
        grpo_loss(logps, logps[:, :2], None, torch.zeros(2), mask)
    with pytest.raises(ValueError, match="advantages shape"):
        grpo_loss(logps, None, None, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="mask shape"):
        grpo_loss(logps, None, None, torch.zeros(2), mask[:1])
