import itertools

import pytest
import torch

import atlas_kernels
from atlas_kernels import grpo_loss, grpo_loss_from_logits, reference, selective_logprobs
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
def test_matches_float64_reference(gen, loss_type, level, beta, off_policy, kl_is):
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
def test_low_precision_inputs(gen, dtype):
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


def test_delta_two_sided_clip(gen):
    logps, old, ref, adv, mask = make_batch(6, 21, gen)
    old = logps - 1.0  # ratio e ~ 2.7 everywhere: delta decides the positive-advantage rows
    opts = dict(delta=1.5, loss_type="bnpo")
    loss, _, grad = run(grpo_loss, logps, old, None, adv, mask, torch.float32, **opts)
    rloss, _, rgrad = run(reference.grpo_loss, logps, old, None, adv, mask, torch.float64, **opts)
    torch.testing.assert_close(loss.double(), rloss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), rgrad, atol=1e-6, rtol=1e-5)


def test_num_items_overrides_token_normaliser(gen):
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


def test_uses_the_triton_kernel(gen, monkeypatch):
    called = []
    original = GRPOLoss.apply
    monkeypatch.setattr(GRPOLoss, "apply", lambda *a: called.append(1) or original(*a))
    logps, old, ref, adv, mask = make_batch(3, 5, gen)
    grpo_loss(logps, old, ref, adv, mask, beta=0.1)
    assert called


def logits_batch(gen, B, T, V, dtype, temperature=0.8):
    """Unshifted logits [B, T+1, V] (a head's output layout) and matching token tensors."""
    base = (torch.randn(B, T + 1, V, generator=gen) * 3).to(dtype)
    index = torch.randint(0, V, (B, T), generator=gen)
    with torch.no_grad():
        lp0 = reference.selective_logprobs(base[:, :-1].double(), index, temperature=temperature).float()
    _, old, _, adv, mask = make_batch(B, T, gen)
    old, ref = lp0 + (old - old.mean()) * 0.1, lp0 + 0.2
    return base, index, old, ref, adv, mask


def grad_seen_by(t):
    """Record the gradient autograd hands to `t` (what its producer's backward consumes)."""
    seen = []
    t.register_hook(lambda g: seen.append(g))
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type, level", [("grpo", "token"), ("dapo", "sequence"), ("cispo", "token")])
@pytest.mark.parametrize("layout", ["unshifted", "sliced"])
def test_from_logits_matches_reference_and_writes_in_place(gen, dtype, loss_type, level, layout):
    B, T, V = 3, 7, 1031
    base, index, old, ref, adv, mask = logits_batch(gen, B, T, V, dtype)
    opts = dict(temperature=0.8, beta=0.04, loss_type=loss_type, importance_sampling_level=level, epsilon_high=0.28,
                return_entropy=True)
    cut = (lambda t: t) if layout == "unshifted" else (lambda t: t[:, :-1])

    leaf = base.clone().requires_grad_()
    logits = leaf * 1  # a non-leaf [B, T+1, V], as a model head's output is
    arg = cut(logits)
    ptr = arg.data_ptr()  # read before backward: the buffer the gradient must land in
    seen = grad_seen_by(arg)
    loss, stats = grpo_loss_from_logits(arg, index, old, ref, adv, mask, **opts)
    loss.backward()

    r_leaf = base.double().requires_grad_()
    rloss, rstats = reference.grpo_loss_from_logits(cut(r_leaf), index, old.double(), ref.double(),
                                                    adv.double(), mask, **opts)
    rloss.backward()
    torch.testing.assert_close(loss.double(), rloss, atol=1e-4, rtol=1e-4)
    tol = 1e-6 if dtype == torch.float32 else 5e-3
    torch.testing.assert_close(leaf.grad.double(), r_leaf.grad, atol=tol, rtol=1e-2)
    torch.testing.assert_close(stats["kl"].double(), rstats["kl"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stats["entropy"].double(), rstats["entropy"], atol=1e-4, rtol=1e-5)
    assert stats["entropy"] > 0 and not stats["entropy"].requires_grad
    # The gradient handed to the logits' producer is the logits buffer itself, now holding d(logits).
    assert seen[0].data_ptr() == ptr
    torch.testing.assert_close(arg.detach(), cut(leaf.grad), atol=0, rtol=0)
    padded = torch.cat([mask, torch.zeros(B, 1, dtype=torch.bool)], 1)  # the last position is no token
    assert (leaf.grad[~padded] == 0).all()


def test_unshifted_equals_sliced_forward_and_backward(gen):
    B, T, V = 4, 6, 517
    base, index, old, ref, adv, mask = logits_batch(gen, B, T, V, torch.float32)
    opts = dict(temperature=0.7, beta=0.04, loss_type="dapo", return_entropy=True)
    results = []
    for cut in (lambda t: t, lambda t: t[:, :-1]):
        leaf = base.clone().requires_grad_()
        loss, stats = grpo_loss_from_logits(cut(leaf * 1), index, old, ref, adv, mask, **opts)
        loss.backward()
        results.append((loss, stats, leaf.grad))
    (l1, s1, g1), (l2, s2, g2) = results
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert (g1[:, -1] == 0).all()


def test_unshifted_head_output_gets_its_gradient_in_place(gen):
    # A real head: the loss hands the head's backward the head output's own buffer (no slice, no
    # zero-filled [B, C+1, V] copy), and the head's gradients match a float64 reference.
    B, C, H, V = 3, 5, 16, 389
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=gen) / H**0.5)
    hidden = torch.randn(B, C + 1, H, generator=gen, requires_grad=True)
    index = torch.randint(0, V, (B, C), generator=gen)
    _, old, ref, adv, mask = make_batch(B, C, gen)
    with torch.no_grad():
        lp0 = reference.selective_logprobs(head(hidden)[:, :-1].double(), index)
    old, ref = lp0.float() + (old - old.mean()) * 0.1, lp0.float() + 0.1
    opts = dict(beta=0.04, loss_type="grpo")

    logits = head(hidden)
    ptr = logits.data_ptr()
    seen = grad_seen_by(logits)
    loss, _ = grpo_loss_from_logits(logits, index, old, ref, adv, mask, **opts)
    loss.backward()
    assert seen[0].data_ptr() == ptr and seen[0].shape == (B, C + 1, V)
    assert (seen[0][:, -1] == 0).all()

    h64 = hidden.detach().double().requires_grad_()
    w64 = head.weight.detach().double().requires_grad_()
    rloss, _ = reference.grpo_loss_from_logits(h64 @ w64.T, index, old.double(), ref.double(), adv.double(),
                                               mask, **opts)
    rloss.backward()
    torch.testing.assert_close(loss.double(), rloss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(head.weight.grad.double(), w64.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("fn", ["grpo_loss_from_logits", "selective_logprobs"])
@pytest.mark.parametrize("owned", ["leaf", "view of a leaf"])
def test_default_never_overwrites_logits_the_caller_owns(gen, fn, owned):
    B, T, V = 2, 5, 301
    base, index, old, ref, adv, mask = logits_batch(gen, B, T, V, torch.float32)
    leaf = base.clone().requires_grad_()
    arg = leaf if owned == "leaf" else leaf[:, :-1]
    if fn == "grpo_loss_from_logits":
        out = grpo_loss_from_logits(arg, index, old, ref, adv, mask, beta=0.04)[0]
    else:
        out = (selective_logprobs(arg, index) * adv[:, None]).sum()
    out.backward()
    assert torch.equal(leaf.detach(), base), "the caller's logits were overwritten"
    r_leaf = base.double().requires_grad_()
    r_arg = r_leaf if owned == "leaf" else r_leaf[:, :-1]
    if fn == "grpo_loss_from_logits":
        ref_out = reference.grpo_loss_from_logits(r_arg, index, old.double(), ref.double(), adv.double(), mask,
                                                  beta=0.04)[0]
    else:
        ref_out = (reference.selective_logprobs(r_arg, index) * adv.double()[:, None]).sum()
    ref_out.backward()
    torch.testing.assert_close(leaf.grad.double(), r_leaf.grad, atol=1e-6, rtol=1e-4)


def test_inplace_choice_follows_ownership():
    from atlas_kernels.logprobs import inplace_is_safe

    leaf = torch.randn(2, 3, 4, requires_grad=True)
    assert not inplace_is_safe(leaf) and not inplace_is_safe(leaf[:, :-1])
    assert not inplace_is_safe(torch.randn(2, 3, 4))  # no grad: nothing to write
    assert inplace_is_safe(leaf * 2) and inplace_is_safe((leaf * 2)[:, :-1])
    with torch.no_grad():
        assert not inplace_is_safe(leaf * 2)


def test_inplace_opt_in_on_a_leaf_writes_the_gradient_there(gen):
    base, index, old, ref, adv, mask = logits_batch(gen, 2, 4, 211, torch.float32)
    leaf = base.clone().requires_grad_()
    loss, _ = grpo_loss_from_logits(leaf, index, old, ref, adv, mask, beta=0.04, inplace_backward=True)
    loss.backward()
    torch.testing.assert_close(leaf.detach(), leaf.grad, atol=0, rtol=0)
    assert not torch.equal(leaf.detach(), base)


def _edit(t):
    with torch.no_grad():
        t.copy_(t.clone())  # same values: only the version counter changes


@pytest.mark.parametrize("name", ["logps", "old_logps", "ref_logps", "advantages", "mask"])
def test_token_loss_raises_on_inputs_edited_before_backward(gen, name):
    logps, old, ref, adv, mask = make_batch(4, 9, gen)
    leaf = logps.clone().requires_grad_()
    inputs = dict(logps=leaf, old_logps=old, ref_logps=ref, advantages=adv, mask=mask)
    loss, stats = grpo_loss(*inputs.values(), beta=0.04, loss_type="bnpo")
    _edit(inputs[name])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("name", ["logits", "index", "old_logps", "ref_logps", "advantages", "mask", "stats"])
def test_fused_loss_raises_on_inputs_edited_before_backward(gen, name):
    base, index, old, ref, adv, mask = logits_batch(gen, 3, 5, 257, torch.float32)
    logits = base.clone().requires_grad_() * 1
    inputs = dict(logits=logits, index=index, old_logps=old, ref_logps=ref, advantages=adv, mask=mask)
    loss, stats = grpo_loss_from_logits(*inputs.values(), beta=0.04, loss_type="bnpo")
    _edit(stats["kl"] if name == "stats" else inputs[name])  # stats share the normaliser the backward reads
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.int64, torch.uint8])
@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_numeric_zero_one_mask_equals_bool_mask(gen, mask_dtype, path):
    base, index, old, ref, adv, mask = logits_batch(gen, 3, 6, 263, torch.float32)
    lib = reference if path == "reference" else atlas_kernels
    results = []
    for m in (mask, mask.to(mask_dtype)):
        for fn in ("grpo_loss", "grpo_loss_from_logits"):
            leaf = base.clone().requires_grad_()
            if fn == "grpo_loss":
                lp = lib.selective_logprobs(leaf[:, :-1], index)
                loss, stats = lib.grpo_loss(lp, old, ref, adv, m, beta=0.04)
            else:
                loss, stats = lib.grpo_loss_from_logits(leaf, index, old, ref, adv, m, beta=0.04)
            loss.backward()
            results.append((loss, leaf.grad, stats["kl"]))
    for got, want in zip(results[2:], results[:2]):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bad", [0.5, 2.0, -1.0, float("nan")])
@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_mask_values_other_than_zero_and_one_are_refused(gen, bad, path):
    base, index, old, ref, adv, mask = logits_batch(gen, 2, 4, 97, torch.float32)
    m = mask.float()
    m[0, 0] = bad
    lib = reference if path == "reference" else atlas_kernels
    with pytest.raises(ValueError, match="mask must be boolean or hold only 0 and 1"):
        lib.grpo_loss(old, None, None, adv, m)
    with pytest.raises(ValueError, match="mask must be boolean or hold only 0 and 1"):
        lib.grpo_loss_from_logits(base, index, old, ref, adv, m, beta=0.04)
    with pytest.raises(ValueError, match="mask must be a bool or 0/1 numeric tensor"):
        lib.grpo_loss(old, None, None, adv, torch.zeros(m.shape, dtype=torch.complex64))


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


@pytest.mark.parametrize("kwargs,message", [
    (dict(beta=float("nan")), "beta must be >= 0"),
    (dict(epsilon_low=float("nan")), "epsilon_low/epsilon_high must be >= 0"),
    (dict(delta=float("nan")), "delta must be > 1"),
    (dict(loss_type="dr_grpo", max_completion_length=-3), "max_completion_length must be a positive int"),
    (dict(loss_type="dr_grpo", max_completion_length=2.5), "max_completion_length must be a positive int"),
])
def test_bad_loss_options_are_named_by_both_paths(kwargs, message):
    logps = -torch.rand(2, 3)
    ref = -torch.rand(2, 3)
    for fn in (grpo_loss, reference.grpo_loss):
        with pytest.raises(ValueError, match=message):
            fn(logps, None, ref, torch.randn(2), torch.ones(2, 3, dtype=torch.bool), **{"beta": 0.1, **kwargs})


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "bnpo"])
def test_empty_batches_are_a_zero_loss_on_both_paths(loss_type):
    for B, T in ((0, 3), (2, 0)):
        for fn in (grpo_loss, reference.grpo_loss):
            loss, _ = fn(torch.zeros(B, T), None, None, torch.zeros(B), torch.ones(B, T, dtype=torch.bool),
                         loss_type=loss_type)
            assert float(loss) == 0.0, (fn, B, T)


def test_old_and_ref_log_probs_are_constants_even_when_they_require_grad(gen):
    logps = (-torch.rand(3, 5, generator=gen) - 0.1).requires_grad_()
    ref = (-torch.rand(3, 5, generator=gen)).requires_grad_()
    adv, mask = torch.randn(3, generator=gen), torch.ones(3, 5, dtype=torch.bool)
    grads = []
    for fn in (grpo_loss, reference.grpo_loss):
        lp = logps.detach().clone().requires_grad_()
        loss, _ = fn(lp, lp, ref, adv, mask, beta=0.1)  # old = the policy's own, undetached
        loss.backward()
        grads.append(lp.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
    assert ref.grad is None
