"""fused_linear_logprobs / fused_linear_grpo_loss against float64 references of the same inputs.

Odd sizes everywhere (H = 37, V = 613: not a power of two). Each plan cuts the work differently:
the whole vocabulary in one tile (the one-pass schedule), tiles of 128 columns with a ragged
last one (two passes), chunks of 7 tokens so gradients add across chunks, and a workspace that
keeps some tiles of the first sweep for the second.
"""
import itertools

import pytest
import torch

from atlas_kernels import fused_linear_grpo_loss, fused_linear_logprobs, reference
from atlas_kernels.fused_linear import FusedLinearGRPOLoss, FusedLinearLogprobs, make_plan

H, V = 37, 613
PLANS = {
    "one_tile": {},
    "tiles": dict(vocab_tile=128),
    "chunks_tiles": dict(vocab_tile=128, chunk_tokens=7),
    "chunks_one_tile": dict(vocab_tile=V, chunk_tokens=7),
    "tiles_kept": dict(vocab_tile=128, chunk_tokens=7, workspace_bytes=3 * 7 * 128 * 4),  # fp32: 2 of 5 tiles kept
}
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo"]


def make_head(gen, n_lead, dtype, *, bias=True, spread=3.0):
    """Hidden states, weight and bias whose logits spread over a few units, like a trained head."""
    hidden = torch.randn(*n_lead, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * (spread / H**0.5)
    b = torch.randn(V, generator=gen) * 0.5 if bias else None
    leaves = [t.to(dtype).requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    return leaves


def float64_twins(*leaves):
    return [t.detach().double().requires_grad_() if t is not None else None for t in leaves]


def grads(*leaves):
    return [None if t is None else t.grad for t in leaves]


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm().clamp(min=1e-30)).item()


def check_grads(got, want, dtype):
    for g, r in zip(got, want):
        if r is None:
            assert g is None
            continue
        assert g is not None and g.dtype != torch.float64
        assert torch.isfinite(g).all()
        assert rel_err(g, r) < (2e-2 if dtype == torch.bfloat16 else 2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("bias, temperature", [(True, 0.7), (False, 1.0)])
def test_logprobs_and_entropy_match_float64(gen, dtype, plan, bias, temperature):
    N = 19
    hidden, weight, b = make_head(gen, (N,), dtype, bias=bias)
    index = torch.randint(0, V, (N,), generator=gen)
    g_lp, g_ent = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    logp, ent = fused_linear_logprobs(hidden, weight, index, bias=b, temperature=temperature, return_entropy=True,
                                      **PLANS[plan])
    (logp * g_lp + ent * g_ent).sum().backward()
    twins = float64_twins(hidden, weight, b)
    rlogp, rent = reference.fused_linear_logprobs(twins[0], twins[1], index, bias=twins[2],
                                                  temperature=temperature, return_entropy=True)
    (rlogp * g_lp.double() + rent * g_ent.double()).sum().backward()

    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == index.shape
    assert (logp <= 0).all()
    # bf16: the head's product is rounded to bf16, as a plain lm_head's output would be.
    atol = 5e-2 if dtype == torch.bfloat16 else 2e-5
    torch.testing.assert_close(logp.double(), rlogp, atol=atol, rtol=1e-3)
    torch.testing.assert_close(ent.double(), rent, atol=atol, rtol=1e-3)
    check_grads(grads(hidden, weight, b), grads(*twins), dtype)


def test_hidden_with_one_extra_position_skips_it(gen):
    B, C = 3, 5
    hidden, weight, _ = make_head(gen, (B, C + 1), torch.float32, bias=False)
    index = torch.randint(0, V, (B, C), generator=gen)
    logp = fused_linear_logprobs(hidden, weight, index, vocab_tile=128)
    logp.sum().backward()
    expected = reference.fused_linear_logprobs(hidden.detach()[:, :-1].double(), weight.detach().double(), index)
    torch.testing.assert_close(logp.double(), expected, atol=2e-5, rtol=1e-5)
    assert (hidden.grad[:, -1] == 0).all() and (hidden.grad[:, :-1] != 0).any()


def test_a_slice_of_longer_hidden_states_is_read_in_place(gen):
    # The trainer's input: last_hidden_state[:, -(C + 1):] of prompt + completion, not contiguous.
    B, P, C = 3, 4, 5
    full, weight, _ = make_head(gen, (B, P + C + 1), torch.float32, bias=False)
    index = torch.randint(0, V, (B, C), generator=gen)
    mask = torch.arange(C)[None, :] < torch.tensor([5, 2, 4])[:, None]
    adv = torch.randn(B, generator=gen)
    hidden = full[:, -(C + 1):]
    assert not hidden.is_contiguous()
    loss, _ = fused_linear_grpo_loss(hidden, weight, index, None, None, adv, mask, loss_type="bnpo")
    loss.backward()
    twin, wtwin = float64_twins(full, weight)
    rloss, _ = reference.fused_linear_grpo_loss(twin[:, -(C + 1):], wtwin, index, None, None, adv.double(), mask,
                                                loss_type="bnpo")
    rloss.backward()
    torch.testing.assert_close(loss.double(), rloss, atol=1e-6, rtol=1e-5)
    check_grads([full.grad, weight.grad], [twin.grad, wtwin.grad], torch.float32)
    assert (full.grad[:, : P] == 0).all()


def make_batch(gen, B, C, *, extra_position):
    hidden, weight, b = make_head(gen, (B, C + int(extra_position)), torch.float32)
    index = torch.randint(0, V, (B, C), generator=gen)
    with torch.no_grad():
        logps = reference.fused_linear_logprobs(hidden, weight, index, bias=b, temperature=0.8)
    old = logps + torch.randn(B, C, generator=gen) * 0.3  # ratios well outside [0.8, 1.2] too
    ref = logps + torch.randn(B, C, generator=gen) * 0.3
    adv = torch.randn(B, generator=gen)
    lengths = torch.randint(1, C + 1, (B,), generator=gen)
    mask = torch.arange(C)[None, :] < lengths[:, None]
    mask[B // 2] = False  # a row of nothing but padding
    return hidden, weight, b, index, old, ref, adv, mask


# Every loss type at both importance-sampling levels, with and without a KL term and old
# log-probs; the plan and input layout rotate through the cases so each gets exercised.
CASES = [(lt, level, beta, off) for lt, level, beta, off in
         itertools.product(LOSS_TYPES, ["token", "sequence"], [0.0, 0.04], [True, False])]


@pytest.mark.parametrize("k", range(len(CASES)), ids=["-".join(map(str, c)) for c in CASES])
def test_grpo_loss_matches_float64(gen, k):
    loss_type, level, beta, off_policy = CASES[k]
    plan = list(PLANS)[k % len(PLANS)]
    hidden, weight, b, index, old, ref, adv, mask = make_batch(gen, 5, 9, extra_position=k % 2 == 0)
    opts = dict(temperature=0.8, beta=beta, loss_type=loss_type, importance_sampling_level=level, epsilon_high=0.28,
                max_completion_length=11, use_bias_correction_kl=k % 3 == 0, return_entropy=True)
    if loss_type == "cispo":
        opts["epsilon_high"] = 3.0
    old = old if off_policy else None
    ref = ref if beta > 0 or k % 4 == 1 else None
    loss, stats = fused_linear_grpo_loss(hidden, weight, index, old, ref, adv, mask, bias=b, **opts, **PLANS[plan])
    (3.0 * loss).backward()  # a non-unit upstream gradient: the stored gradients must scale
    twins = float64_twins(hidden, weight, b)
    rloss, rstats = reference.fused_linear_grpo_loss(
        twins[0], twins[1], index, None if old is None else old.double(), None if ref is None else ref.double(),
        adv.double(), mask, bias=twins[2], **opts)
    (3.0 * rloss).backward()

    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), rloss, atol=1e-6, rtol=1e-5)
    assert stats.keys() == rstats.keys()
    for key in stats:
        torch.testing.assert_close(stats[key].double(), rstats[key], atol=1e-5, rtol=1e-5)
    check_grads(grads(hidden, weight, b), grads(*twins), torch.float32)
    # Padding rows and the extra last position never reach the loss: their hidden states get 0.
    rows = hidden.grad[:, : index.shape[1]]
    assert (rows[~mask] == 0).all()
    if hidden.shape[1] > index.shape[1]:
        assert (hidden.grad[:, -1] == 0).all()


@pytest.mark.parametrize("plan", ["one_tile", "tiles"])
def test_grpo_loss_bf16(gen, plan):
    hidden, weight, b, index, old, ref, adv, mask = make_batch(gen, 4, 8, extra_position=True)
    hidden, weight, b = (t.detach().to(torch.bfloat16).requires_grad_() for t in (hidden, weight, b))
    # On-policy: bf16 rounding moves log-probs by ~1e-2, enough to flip a token across a clip
    # boundary, and a flipped token changes the gradient by design. The KL keeps it non-trivial.
    opts = dict(temperature=0.8, beta=0.04, loss_type="dapo")
    loss, _ = fused_linear_grpo_loss(hidden, weight, index, None, ref, adv, mask, bias=b, **opts, **PLANS[plan])
    loss.backward()
    twins = float64_twins(hidden, weight, b)
    rloss, _ = reference.fused_linear_grpo_loss(twins[0], twins[1], index, None, ref.double(), adv.double(),
                                                mask, bias=twins[2], **opts)
    rloss.backward()
    assert hidden.grad.dtype == weight.grad.dtype == b.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), rloss, atol=2e-2, rtol=2e-2)
    check_grads(grads(hidden, weight, b), grads(*twins), torch.bfloat16)


@pytest.mark.parametrize("plan", ["one_tile", "chunks_tiles"])
def test_tied_weights_accumulate_both_gradients(gen, plan):
    # The head's weight is also the input embedding: its gradient is the sum of both uses.
    B, C = 3, 6
    emb = (torch.randn(V, H, generator=gen) * (3.0 / H**0.5)).requires_grad_()
    ids = torch.randint(0, V, (B, C + 1), generator=gen)
    index = ids[:, 1:]
    mask = torch.ones(B, C, dtype=torch.bool)
    adv = torch.randn(B, generator=gen)

    def run(weight, fn):
        hidden = torch.tanh(torch.nn.functional.embedding(ids, weight) * 2.0)  # [B, C+1, H]
        loss, _ = fn(hidden, weight, index, None, None, adv.to(weight.dtype), mask, loss_type="bnpo",
                     **(PLANS[plan] if fn is fused_linear_grpo_loss else {}))
        loss.backward()
        return loss

    loss = run(emb, fused_linear_grpo_loss)
    twin = emb.detach().double().requires_grad_()
    rloss = run(twin, reference.fused_linear_grpo_loss)
    torch.testing.assert_close(loss.double(), rloss, atol=1e-6, rtol=1e-5)
    assert rel_err(emb.grad, twin.grad) < 2e-6


def test_fp32_parameters_under_bf16_autocast(gen):
    # The trainer's mixed precision: fp32 master weights, the head's GEMMs in bf16.
    hidden, weight, b, index, old, ref, adv, mask = make_batch(gen, 3, 6, extra_position=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = fused_linear_grpo_loss(hidden, weight, index, None, ref, adv, mask, bias=b, beta=0.04,
                                         temperature=0.8, vocab_tile=128)
    loss.backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32
    twins = float64_twins(hidden, weight, b)
    rloss, _ = reference.fused_linear_grpo_loss(twins[0], twins[1], index, None, ref.double(),
                                                adv.double(), mask, bias=twins[2], beta=0.04, temperature=0.8)
    rloss.backward()
    torch.testing.assert_close(loss.double(), rloss, atol=2e-2, rtol=2e-2)
    check_grads(grads(hidden, weight, b), grads(*twins), torch.bfloat16)


def test_no_grad_forward_and_frozen_head(gen):
    hidden, weight, b, index, old, ref, adv, mask = make_batch(gen, 3, 6, extra_position=True)
    with torch.no_grad():
        loss, _ = fused_linear_grpo_loss(hidden, weight, index, old, ref, adv, mask, bias=b)
    assert loss.grad_fn is None
    weight.requires_grad_(False)
    b.requires_grad_(False)
    loss, _ = fused_linear_grpo_loss(hidden, weight, index, old, ref, adv, mask, bias=b, vocab_tile=128)
    loss.backward()
    assert weight.grad is None and b.grad is None and hidden.grad is not None


def test_second_backward_raises(gen):
    hidden, weight, b, index, old, ref, adv, mask = make_batch(gen, 2, 4, extra_position=False)
    loss, _ = fused_linear_grpo_loss(hidden, weight, index, old, ref, adv, mask, bias=b)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_extreme_and_nan_inputs(gen):
    hidden, weight, _ = make_head(gen, (4,), torch.float32, bias=False, spread=300.0)  # logits ~ 1e3
    index = torch.randint(0, V, (4,), generator=gen)
    logp, ent = fused_linear_logprobs(hidden, weight, index, return_entropy=True, vocab_tile=128)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all() and (logp <= 0).all()
    expected = reference.fused_linear_logprobs(hidden.detach().double(), weight.detach().double(), index)
    torch.testing.assert_close(logp.double(), expected, atol=1e-3, rtol=1e-5)
    poisoned = hidden.detach().clone()
    poisoned[2, 0] = float("nan")
    logp = fused_linear_logprobs(poisoned, weight.detach(), index, vocab_tile=128)
    assert torch.isnan(logp[2]) and torch.isfinite(logp[[0, 1, 3]]).all()  # NaN is reported, not hidden


def test_runs_the_triton_path_under_the_interpreter(monkeypatch, gen):
    called = []
    for fn in (FusedLinearLogprobs, FusedLinearGRPOLoss):
        original = fn.apply
        monkeypatch.setattr(fn, "apply", lambda *a, _o=original: called.append(1) or _o(*a))
    hidden, weight, b, index, old, ref, adv, mask = make_batch(gen, 2, 3, extra_position=False)
    fused_linear_logprobs(hidden, weight, index)
    fused_linear_grpo_loss(hidden, weight, index, old, ref, adv, mask)
    assert len(called) == 2, "CPU tensors under TRITON_INTERPRET=1 must take the Triton path"


def test_plan_bounds_the_workspace():
    V_QWEN, MiB = 151936, 2**20
    small = make_plan(16, V_QWEN, 2)  # 4.6 MiB of logits: one chunk, one tile, one pass
    assert small.one_pass and small.chunk == 16
    default = make_plan(8192, V_QWEN, 2)  # one pass in chunks of whole vocabulary rows
    assert default.one_pass and default.tile == V_QWEN and default.chunk * V_QWEN * 2 <= 320 * MiB
    wide = make_plan(8192, V_QWEN, 2, hidden_size=3584)  # wider heads: longer chunks, fewer d(weight) updates
    assert wide.one_pass and wide.chunk == 2048
    lean = make_plan(8192, V_QWEN, 2, workspace_bytes=64 * MiB)  # two sweeps, every token in one chunk
    assert not lean.one_pass and lean.keep == 0 and lean.chunk == 8192 and lean.chunk * lean.tile * 2 <= 64 * MiB
    kept = make_plan(8192, V_QWEN, 2, vocab_tile=4096, workspace_bytes=16 * 64 * MiB)  # 15 kept, one for the rest
    assert (kept.keep, kept.slots, kept.n_tiles) == (15, 16, 38) and not kept.one_pass
    assert make_plan(45, V, 4, **PLANS["tiles_kept"]).keep == 2


@pytest.mark.parametrize("hidden, weight, index, kwargs, match", [
    (torch.randn(3, 8), torch.randn(10, 7), torch.tensor([1, 2, 3]), {}, "hidden must be"),
    (torch.randn(3, 8), torch.randn(10, 8), torch.tensor([1]), {}, "index shape"),
    (torch.randn(3, 8), torch.randn(10, 8), torch.tensor([1, 2, 10]), {}, "index out of range"),
    (torch.randn(3, 8), torch.randn(10, 8), torch.tensor([1.0, 2.0, 3.0]), {}, "index must be"),
    (torch.randn(3, 8), torch.randn(10, 8), torch.tensor([1, 2, 3]), {"bias": torch.randn(9)}, "bias must be"),
    (torch.randn(3, 8), torch.randn(10, 8), torch.tensor([1, 2, 3]), {"temperature": 0.0}, "temperature"),
    (torch.randint(0, 3, (3, 8)), torch.randn(10, 8), torch.tensor([1, 2, 3]), {}, "hidden must be a floating"),
    (torch.randn(3, 8), torch.randn(10), torch.tensor([1, 2, 3]), {}, "weight must be"),
])
def test_bad_input_names_the_argument(hidden, weight, index, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fused_linear_logprobs(hidden, weight, index, **kwargs)
    with pytest.raises(ValueError, match=match):
        reference.fused_linear_logprobs(hidden, weight, index, **kwargs)


def test_no_tokens_give_zero_gradients():
    """Nothing to score: no chunk runs, and the gradients are zeros, not the memory's old contents."""
    hidden = torch.randn(2, 1, 8, requires_grad=True)
    weight = torch.randn(17, 8, requires_grad=True)
    fused_linear_logprobs(hidden, weight, torch.zeros(2, 0, dtype=torch.long)).sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(hidden.grad, torch.zeros_like(hidden))
