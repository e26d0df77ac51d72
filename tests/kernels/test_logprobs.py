import pytest
import torch

from atlas_kernels import reference, selective_logprobs
from atlas_kernels.logprobs import SelectiveLogprobs

from .helpers import TOL, rel_err

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_logits(shape, dtype, gen, spread=4.0):
    return (torch.randn(shape, generator=gen) * spread).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1000, 4099, 32003])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_and_grad_match_float64(gen, dtype, vocab, temperature):
    rows = 3 if vocab > 10000 else 7  # odd row counts, never a multiple of anything
    logits = make_logits((rows, vocab), dtype, gen).requires_grad_()
    index = torch.randint(0, vocab, (rows,), generator=gen)
    logp, ent = selective_logprobs(logits, index, temperature=temperature, return_entropy=True)
    g1, g2 = torch.randn(rows, generator=gen), torch.randn(rows, generator=gen)
    (logp * g1 + ent * g2).sum().backward()

    ref_in = logits.detach().double().requires_grad_()
    rlogp, rent = reference.selective_logprobs(ref_in, index, temperature=temperature, return_entropy=True)
    (rlogp * g1.double() + rent * g2.double()).sum().backward()

    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    assert (logp <= 0).all()
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all() and torch.isfinite(logits.grad.float()).all()
    torch.testing.assert_close(logp.double(), rlogp, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ent.double(), rent, atol=1e-4, rtol=1e-5)
    atol, rtol = TOL[dtype]
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(logits.grad.double(), ref_in.grad, atol=atol * 0.1, rtol=rtol)


def test_large_vocabulary_few_rows(gen):
    logits = make_logits((2, 151936), torch.bfloat16, gen).requires_grad_()
    index = torch.randint(0, 151936, (2,), generator=gen)
    logp = selective_logprobs(logits, index)
    logp.sum().backward()
    ref_in = logits.detach().double().requires_grad_()
    reference.selective_logprobs(ref_in, index).sum().backward()
    torch.testing.assert_close(logp.double(), reference.selective_logprobs(logits.detach().double(), index), atol=1e-4, rtol=1e-5)
    assert rel_err(logits.grad, ref_in.grad) < 1e-2


def test_strided_view_reads_without_copy_and_grads_land_in_the_slice(gen):
    full = make_logits((3, 6, 517), torch.float32, gen).requires_grad_()
    view = full[:, :-1]  # the usual "drop the last position" slice: not contiguous
    assert not view.is_contiguous()
    index = torch.randint(0, 517, (3, 5), generator=gen)
    logp = selective_logprobs(view, index, temperature=0.9)
    assert logp.shape == (3, 5)
    logp.sum().backward()
    ref_in = full.detach().double().requires_grad_()
    reference.selective_logprobs(ref_in[:, :-1], index, temperature=0.9).sum().backward()
    torch.testing.assert_close(full.grad.double(), ref_in.grad, atol=2e-6, rtol=1e-5)
    assert (full.grad[:, -1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_equals_out_of_place(gen, dtype):
    base = make_logits((2, 5, 777), dtype, gen)
    index = torch.randint(0, 777, (2, 4), generator=gen)
    g = torch.randn(2, 4, generator=gen)
    grads = []
    for inplace in (False, True):
        leaf = base.clone().requires_grad_()
        logits = leaf * 1  # a non-leaf buffer, as an lm_head output is
        logp, ent = selective_logprobs(logits[:, :-1], index, return_entropy=True, inplace_backward=inplace)
        (logp * g + ent).sum().backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("inplace", [None, True])
def test_rows_sharing_memory_get_their_summed_gradient(gen, inplace):
    """Expanded logits (rows that share memory) never take the in-place backward: each row's
    gradient would overwrite the others'."""
    from atlas_kernels import grpo_loss_from_logits

    leaf = make_logits((1, 3, 131), torch.float32, gen).requires_grad_()
    index = torch.randint(0, 131, (2, 3), generator=gen)
    ref_in = leaf.detach().double().requires_grad_()
    reference.selective_logprobs(ref_in.expand(2, 3, 131), index).sum().backward()
    selective_logprobs((leaf * 1).expand(2, 3, 131), index, inplace_backward=inplace).sum().backward()
    torch.testing.assert_close(leaf.grad.double(), ref_in.grad, atol=1e-5, rtol=1e-5)

    head = make_logits((1, 4, 131), torch.float32, gen).requires_grad_()  # unshifted: C + 1 positions
    adv, mask = torch.randn(2, generator=gen), torch.ones(2, 3, dtype=torch.bool)
    loss, _ = grpo_loss_from_logits((head * 1).expand(2, 4, 131), index, None, None, adv, mask, beta=0.0,
                                    inplace_backward=inplace)
    loss.backward()
    ref_head = head.detach().double().requires_grad_()
    ref_logp = reference.selective_logprobs(ref_head.expand(2, 4, 131)[:, :-1], index)
    reference.grpo_loss(ref_logp, None, None, adv.double(), mask, beta=0.0)[0].backward()
    torch.testing.assert_close(head.grad.double(), ref_head.grad, atol=1e-5, rtol=1e-5)


def test_inplace_backward_bumps_version_so_reuse_fails_loudly(gen):
    leaf = make_logits((4, 300), torch.float32, gen).requires_grad_()
    logits = leaf * 1
    index = torch.randint(0, 300, (4,), generator=gen)
    other = (logits * logits).sum()  # saves `logits` for its own backward
    logp = selective_logprobs(logits, index, inplace_backward=True)
    logp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        other.backward()


def test_extreme_logits_stay_finite_and_nonpositive():
    logits = torch.full((3, 1000), -1e4)
    logits[0, 5] = 1e4  # a near-certain token: rounding must not make its log-prob positive
    logits[1, :] = 0.0
    logits[2, :500] = float("-inf")  # masked vocabulary entries
    index = torch.tensor([5, 7, 600])
    logp, ent = selective_logprobs(logits, index, return_entropy=True)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert (logp <= 0).all()
    torch.testing.assert_close(logp[1], torch.tensor(-torch.log(torch.tensor(1000.0)).item()))
    torch.testing.assert_close(ent[2], torch.log(torch.tensor(500.0)), atol=1e-5, rtol=1e-5)


def test_block_smaller_than_vocab_masking_has_no_nan(gen, monkeypatch):
    import atlas_kernels.logprobs as lp_mod

    monkeypatch.setattr(lp_mod, "FWD_BLOCK_V", 256)
    monkeypatch.setattr(lp_mod, "BWD_BLOCK_V", 128)  # several chunks plus a ragged tail
    logits = make_logits((5, 1001), torch.float32, gen).requires_grad_()
    index = torch.randint(0, 1001, (5,), generator=gen)
    logp = selective_logprobs(logits, index)
    logp.sum().backward()
    ref_in = logits.detach().double().requires_grad_()
    reference.selective_logprobs(ref_in, index).sum().backward()
    torch.testing.assert_close(logp.double(), reference.selective_logprobs(logits.detach().double(), index), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.grad.double(), ref_in.grad, atol=1e-6, rtol=1e-5)


def test_runs_the_triton_kernel_under_the_interpreter(monkeypatch):
    called = []
    original = SelectiveLogprobs.apply
    monkeypatch.setattr(SelectiveLogprobs, "apply", lambda *a: called.append(1) or original(*a))
    selective_logprobs(torch.randn(2, 10), torch.tensor([1, 2]))
    assert called, "CPU tensors under TRITON_INTERPRET=1 must take the Triton path"


def test_reference_path_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    logits = torch.randn(3, 50, dtype=torch.float64)
    index = torch.tensor([0, 10, 49])
    expected = torch.log_softmax(logits, -1).gather(-1, index[:, None]).squeeze(-1)
    torch.testing.assert_close(selective_logprobs(logits, index), expected)


@pytest.mark.parametrize(
    "logits, index, kwargs, match",
    [
        (torch.randn(2, 10), torch.tensor([1, 10]), {}, "index out of range"),
        (torch.randn(2, 10), torch.tensor([-1, 0]), {}, "index out of range"),
        (torch.randn(2, 10), torch.tensor([1, 2, 3]), {}, "index shape"),
        (torch.randn(2, 10), torch.tensor([1.0, 2.0]), {}, "index must be an int64"),
        (torch.randint(0, 5, (2, 10)), torch.tensor([1, 2]), {}, "logits must be a floating"),
        (torch.randn(2, 10), torch.tensor([1, 2]), {"temperature": 0.0}, "temperature"),
    ],
)
def test_bad_input_names_the_argument(logits, index, kwargs, match):
    with pytest.raises(ValueError, match=match):
        selective_logprobs(logits, index, **kwargs)


@pytest.mark.parametrize("inplace", [None, False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unshifted_logits_equal_the_sliced_view(gen, dtype, inplace):
    B, T, V = 3, 6, 389
    base = make_logits((B, T + 1, V), dtype, gen)
    index = torch.randint(0, V, (B, T), generator=gen)
    g1, g2 = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    outs = []
    for cut in (lambda t: t, lambda t: t[:, :-1]):
        leaf = base.clone().requires_grad_()
        logp, ent = selective_logprobs(cut(leaf * 1), index, temperature=0.8, return_entropy=True,
                                       inplace_backward=inplace)
        (logp * g1 + ent * g2).sum().backward()
        outs.append((logp, ent, leaf.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert (outs[0][2][:, -1] == 0).all()
    ref_in = base.double().requires_grad_()
    rlogp, rent = reference.selective_logprobs(ref_in, index, temperature=0.8, return_entropy=True)
    (rlogp * g1.double() + rent * g2.double()).sum().backward()
    assert rlogp.shape == (B, T)
    torch.testing.assert_close(outs[0][0].double(), rlogp, atol=1e-4, rtol=1e-5)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(outs[0][2].double(), ref_in.grad, atol=atol * 0.1, rtol=rtol)


def test_unshifted_two_dim_logits(gen):
    logits = make_logits((8, 101), torch.float32, gen).requires_grad_()
    index = torch.randint(0, 101, (7,), generator=gen)
    logp = selective_logprobs(logits, index)
    logp.sum().backward()
    torch.testing.assert_close(logp.double(), reference.selective_logprobs(logits.detach()[:-1].double(), index),
                               atol=1e-5, rtol=1e-5)
    assert (logits.grad[-1] == 0).all() and (logits.grad[:-1] != 0).any()


@pytest.mark.parametrize("name", ["logits", "index", "entropy"])
def test_inputs_edited_before_backward_raise(gen, name):
    logits = make_logits((2, 5, 211), torch.float32, gen).requires_grad_() * 1
    index = torch.randint(0, 211, (2, 4), generator=gen)
    logp, ent = selective_logprobs(logits, index, return_entropy=True)
    with torch.no_grad():
        target = dict(logits=logits, index=index, entropy=ent)[name]
        target.copy_(target.clone())
    # (autograd words it differently for an output view, but refuses either way)
    with pytest.raises(RuntimeError, match="modified by an inplace operation|modified inplace"):
        (logp + ent).sum().backward()


def test_index_two_positions_short_is_refused():
    with pytest.raises(ValueError, match="index shape"):
        selective_logprobs(torch.randn(2, 7, 10), torch.zeros(2, 5, dtype=torch.long))


def test_reference_entropy_gradient_is_finite_with_minus_inf_logits(gen):
    """Banned tokens (-inf logits) have probability 0 and add nothing to the entropy or its gradient."""
    logits = make_logits((3, 10), torch.float32, gen)
    logits[:, ::2] = -torch.inf
    index = torch.tensor([1, 3, 5])
    grads = []
    for fn in (reference.selective_logprobs, selective_logprobs):
        x = logits.clone().requires_grad_()
        logp, ent = fn(x, index, return_entropy=True)
        (logp + ent).sum().backward()
        assert torch.isfinite(ent).all()
        grads.append(x.grad)
    assert torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)
