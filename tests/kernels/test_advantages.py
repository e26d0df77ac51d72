import pytest
import torch

from atlas_kernels import group_advantages, reference
from atlas_kernels.advantages import GroupAdvantages


def rewards_with_holes(n_groups, g, gen, nan_frac=0.2):
    r = torch.randn(n_groups * g, generator=gen) * 3 + 1
    r[torch.rand(r.shape, generator=gen) < nan_frac] = float("nan")
    return r


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("n_groups, g", [(1, 2), (7, 8), (13, 5), (300, 16), (3, 33)])
def test_matches_float64_reference_forward_and_backward(gen, scale, n_groups, g):
    r = rewards_with_holes(n_groups, g, gen)
    r[:g] = float("nan")  # one group with no valid reward
    if n_groups > 2:
        r[g : 2 * g] = 1.5  # one group where every reward is equal (std 0)
        r[2 * g] = 0.5  # ... and a group with a single valid reward
        r[2 * g + 1 : 3 * g] = float("nan")
    leaf = r.clone().requires_grad_()
    adv, mean, std = group_advantages(leaf, g, scale=scale)
    gout = torch.randn(adv.shape, generator=gen)
    (adv * gout).sum().backward()

    r64 = r.double().requires_grad_()
    radv, rmean, rstd = reference.group_advantages(r64, g, scale=scale)
    (radv * gout.double()).sum().backward()

    for t in (adv, mean, std, leaf.grad):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(adv.double(), radv, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mean.double(), rmean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std.double(), rstd, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(leaf.grad.double(), r64.grad, atol=1e-3, rtol=1e-3)
    assert (adv[torch.isnan(r)] == 0).all()
    assert (adv[:g] == 0).all()


def test_known_values():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 5.0, 5.0, 5.0, 5.0])
    adv, mean, std = group_advantages(r, 4)
    s = torch.tensor([1.0, 0.0, 1.0, 0.0]).std().item()
    torch.testing.assert_close(adv[:4], torch.tensor([0.5, -0.5, 0.5, -0.5]) / (s + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))
    torch.testing.assert_close(mean, torch.tensor([0.5, 5.0]))
    torch.testing.assert_close(std, torch.tensor([s, 0.0]))


def test_uses_the_triton_kernel(monkeypatch):
    called = []
    original = GroupAdvantages.apply
    monkeypatch.setattr(GroupAdvantages, "apply", lambda *a: called.append(1) or original(*a))
    group_advantages(torch.randn(8), 4)
    assert called


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.randn(10), 4), {}, "group_size 4 must divide"),
        ((torch.randn(8), 0), {}, "group_size must be a positive int"),
        ((torch.randn(8), 4), {"scale": "global"}, "scale must be one of"),
        ((torch.randn(2, 4), 4), {}, "rewards must be 1-D"),
        ((torch.arange(8), 4), {}, "rewards must be a floating"),
    ],
)
def test_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(*args, **kwargs)


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_eps_zero_is_refused_where_a_zero_std_would_divide(scale):
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0])  # the first group's std is 0
    for fn in (group_advantages, reference.group_advantages):
        with pytest.raises(ValueError, match="eps must be > 0"):
            fn(rewards, 2, scale=scale, eps=0.0)
    adv, _, _ = group_advantages(rewards, 2, scale="none", eps=0.0)  # no division: eps plays no part
    assert torch.equal(adv, torch.tensor([0.0, 0.0, -0.5, 0.5]))
