"""The compiled kernels on a real GPU, at production shapes, against float64 references.

Skipped without CUDA (CI has none). On a GPU machine, from the repo root, with nothing to set:

    python -m pytest tests/kernels/test_cuda.py

(tests/conftest.py leaves the Triton interpreter off when a CUDA device is visible.)
"""
import os
import threading

import pytest
import torch

from atlas_kernels import group_advantages, grpo_loss, grpo_loss_from_logits, kl_k3, reference, selective_logprobs

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", reason="needs a CUDA GPU, compiled"
)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("V", [151936, 32000, 4099])
def test_selective_logprobs_cuda(seed, dtype, V):
    g = torch.Generator(device="cuda").manual_seed(seed)
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
def test_grpo_loss_from_logits_cuda(seed, loss_type, level):
    g = torch.Generator(device="cuda").manual_seed(seed)
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


def test_small_ops_cuda(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
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


# N x V beyond 2**31 elements: any offset computed in int32 (pid * stride) wraps around. Unshifted
# [4, 3551, 151936] bf16 logits are 4.3 GB; the last token's row starts past element 2**31.
BIG_B, BIG_C, BIG_V = 4, 3550, 151936
big_memory = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
    reason="needs about 20 GiB of GPU memory",
)


def _sampled_tokens(B, C, g):
    """(b, t) pairs to check against the reference: both ends, the last rows (the largest offsets), random ones."""
    picks = {(0, 0), (B - 1, C - 1), (B - 1, C - 2), (B // 2, C // 2)}
    bs = torch.randint(0, B, (8,), device="cuda", generator=g).tolist()
    ts = torch.randint(0, C, (8,), device="cuda", generator=g).tolist()
    return sorted(picks | set(zip(bs, ts)))


def _reference_logps(logits, index, temperature, rows=256):
    """float64 reference log-probs of unshifted logits [B, C+1, V], a few rows at a time."""
    B, C = index.shape
    out = torch.empty(B, C, device=logits.device, dtype=torch.float64)
    with torch.no_grad():
        for b in range(B):
            for s in range(0, C, rows):
                e = min(C, s + rows)
                out[b, s:e] = reference.selective_logprobs(logits[b, s:e].double(), index[b, s:e], temperature=temperature)
    return out


def _reference_row_grad(logits, index, b, t, g_logp, temperature):
    x = logits[b, t].detach().double().requires_grad_()
    lp = reference.selective_logprobs(x, index[b, t], temperature=temperature)
    (lp * g_logp).backward()
    return lp.detach(), x.grad


def _assert_grad_row(ours, ref):
    scale = ref.abs().max().item()
    err = (ours.double() - ref).abs().max().item()
    assert err <= 1e-2 * scale + 1e-7, (err, scale)


@big_memory
def test_selective_logprobs_beyond_int32_offsets(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    temperature = 0.9
    leaf = torch.randn(BIG_B, BIG_C + 1, BIG_V, device="cuda", generator=g, dtype=torch.bfloat16).mul_(2).requires_grad_()
    index = torch.randint(0, BIG_V, (BIG_B, BIG_C), device="cuda", generator=g)
    assert leaf[:, :-1].numel() > 2**31
    g_logp = torch.randn(BIG_B, BIG_C, device="cuda", generator=g)
    logp = selective_logprobs(leaf, index, temperature=temperature)  # unshifted, a leaf: out of place
    (logp * g_logp).sum().backward()
    assert (logp <= 0).all() and torch.isfinite(logp).all()
    torch.testing.assert_close(logp.double(), _reference_logps(leaf.detach(), index, temperature), atol=2e-4, rtol=1e-5)
    assert (leaf.grad[:, -1] == 0).all()
    for b, t in _sampled_tokens(BIG_B, BIG_C, g):
        _, rgrad = _reference_row_grad(leaf, index, b, t, g_logp[b, t].double(), temperature)
        _assert_grad_row(leaf.grad[b, t], rgrad)


@big_memory
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_grpo_loss_from_logits_beyond_int32_offsets(seed, loss_type):
    g = torch.Generator(device="cuda").manual_seed(seed)
    temperature = 0.7
    leaf = torch.randn(BIG_B, BIG_C + 1, BIG_V, device="cuda", generator=g, dtype=torch.bfloat16).mul_(2).requires_grad_()
    index = torch.randint(0, BIG_V, (BIG_B, BIG_C), device="cuda", generator=g)
    base = _reference_logps(leaf.detach(), index, temperature)
    old = (base + 0.1 * torch.randn(base.shape, device="cuda", generator=g, dtype=torch.float64)).float()
    ref = (base + 0.2 * torch.randn(base.shape, device="cuda", generator=g, dtype=torch.float64)).float()
    adv = torch.randn(BIG_B, device="cuda", generator=g)
    lengths = torch.randint(BIG_C // 2, BIG_C + 1, (BIG_B, 1), device="cuda", generator=g)
    lengths[-1] = BIG_C  # the last row's tokens, at the largest offsets, all count
    mask = torch.arange(BIG_C, device="cuda")[None] < lengths
    opts = dict(temperature=temperature, beta=0.04, loss_type=loss_type, epsilon_high=0.28)

    head_out = leaf * 1  # a non-leaf, as a model head's output: the gradient is written into it
    loss, stats = grpo_loss_from_logits(head_out, index, old, ref, adv, mask, **opts)
    loss.backward()
    lp64 = base.clone().requires_grad_()
    rloss, rstats = reference.grpo_loss(lp64, old.double(), ref.double(), adv.double(), mask,
                                        **{k: v for k, v in opts.items() if k != "temperature"})
    rloss.backward()
    torch.testing.assert_close(loss.double(), rloss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stats["kl"].double(), rstats["kl"], atol=1e-5, rtol=1e-4)
    assert (leaf.grad[:, -1] == 0).all()
    for b, t in _sampled_tokens(BIG_B, BIG_C, g):
        _, rgrad = _reference_row_grad(leaf, index, b, t, lp64.grad[b, t], temperature)
        _assert_grad_row(leaf.grad[b, t], rgrad)


def test_concurrent_calls_from_several_streams(seed):
    # Each thread drives its own stream: forward and backward of the fused loss and of the
    # log-probs, several times over, overlapping on the GPU. Every result must equal the one
    # computed alone on the default stream.
    g = torch.Generator(device="cuda").manual_seed(seed)
    K, B, T, V, rounds = 4, 4, 200, 32000, 3
    cases = []
    for _ in range(K):
        logits = (torch.randn(B, T + 1, V, device="cuda", generator=g) * 2).to(torch.bfloat16)
        index = torch.randint(0, V, (B, T), device="cuda", generator=g)
        lp = reference.selective_logprobs(logits, index).float()
        old, ref = lp + 0.1 * torch.randn(lp.shape, device="cuda", generator=g), lp + 0.1
        adv = torch.randn(B, device="cuda", generator=g)
        mask = torch.arange(T, device="cuda")[None] < torch.randint(1, T + 1, (B, 1), device="cuda", generator=g)
        cases.append((logits, index, old, ref, adv, mask))

    def run(case):
        logits, index, old, ref, adv, mask = case
        leaf = logits.clone().requires_grad_()
        loss, stats = grpo_loss_from_logits(leaf * 1, index, old, ref, adv, mask, beta=0.04, loss_type="dapo")
        loss.backward()
        leaf2 = logits.clone().requires_grad_()
        logp = selective_logprobs(leaf2 * 1, index, temperature=0.8)
        (logp * adv[:, None]).sum().backward()
        return loss.detach(), stats["kl"], leaf.grad, logp.detach(), leaf2.grad

    expected = [run(c) for c in cases]  # also compiles every kernel before the threads start
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream() for _ in range(K)]
    results: list = [None] * K
    errors: list = []

    def worker(k):
        try:
            with torch.cuda.stream(streams[k]):
                for _ in range(rounds):
                    results[k] = run(cases[k])
        except Exception as exc:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(K)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    torch.cuda.synchronize()
    assert not errors, errors
    for got, want in zip(results, expected):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("H", [896, 1536, 3584])
def test_layer_kernels_match_the_hf_modules_bit_for_bit_cuda(seed, H):
    """rms_norm and silu_mul compiled, at the Qwen2.5 shapes, against the modules they replace in
    bf16: the same roundings in the same places, so outputs agree bit for bit but where the row's
    mean square (summed in another order) tips a rounding; gradients close."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from atlas_kernels import rms_norm, silu_mul

    g = torch.Generator(device="cuda").manual_seed(seed)
    norm = Qwen2RMSNorm(H, eps=1e-6).to("cuda", torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(H, device="cuda", generator=g))
    x = (3 * torch.randn(4099, H, device="cuda", generator=g)).to(torch.bfloat16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = rms_norm(xa, norm.weight, norm.variance_epsilon), norm(xb)
    same = (ours == theirs).float().mean().item()
    assert same > 0.999, same
    torch.testing.assert_close(ours, theirs, atol=2 ** -6, rtol=2 ** -7)
    dy = torch.randn(4099, H, device="cuda", generator=g).to(torch.bfloat16)
    ours.backward(dy)
    theirs.backward(dy)
    torch.testing.assert_close(xa.grad.float(), xb.grad.float(), atol=3e-2, rtol=2e-2)
    gate = (4 * torch.randn(4099, 4 * H, device="cuda", generator=g)).to(torch.bfloat16)
    up = torch.randn(4099, 4 * H, device="cuda", generator=g).to(torch.bfloat16)
    assert torch.equal(silu_mul(gate, up), torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("Hq, Hkv, D", [(12, 2, 128), (14, 2, 64), (28, 4, 128)])
def test_rope_matches_hf_apply_rotary_pos_emb_bit_for_bit_cuda(seed, Hq, Hkv, D):
    """rope compiled, at the Qwen2.5 1.5B / 0.5B / 7B head shapes, against transformers' function
    on queries and keys as the attention makes them (transposed views of the projections) with a
    Qwen2 rotary embedding's cos/sin over packed sequences: in bf16 each product and the sum are
    rounded where PyTorch rounds them, forward and backward, so all agree bit for bit; in float32
    within a few ulps of float64 (the compiler may fuse a product into the sum)."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb

    from atlas_kernels import rope

    g = torch.Generator(device="cuda").manual_seed(seed)
    B, T = 2, 4099
    cfg = Qwen2Config(hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=Hkv, max_position_embeddings=32768)
    rotary = Qwen2RotaryEmbedding(cfg).to("cuda")
    lengths = torch.randint(T // 4 + 1, 3000, (B, 4), device="cuda", generator=g)
    position_ids = torch.stack([torch.cat([torch.arange(int(n), device="cuda") for n in row])[:T] for row in lengths])
    assert position_ids.shape == (B, T)  # 4 sequences of up to 3000 tokens per row, cut at T
    for dtype in (torch.bfloat16, torch.float32):
        cos, sin = rotary(torch.empty(1, device="cuda", dtype=dtype), position_ids)
        q = (2 * torch.randn(B, T, Hq, D, device="cuda", generator=g)).to(dtype).transpose(1, 2)
        k = (2 * torch.randn(B, T, Hkv, D, device="cuda", generator=g)).to(dtype).transpose(1, 2)
        dq = torch.randn(B, Hq, T, D, device="cuda", generator=g).to(dtype)
        dk = torch.randn(B, Hkv, T, D, device="cuda", generator=g).to(dtype)
        qa, ka = q.clone().requires_grad_(), k.clone().requires_grad_()
        qb, kb = q.clone().requires_grad_(), k.clone().requires_grad_()
        ours, theirs = rope(qa, ka, cos, sin), apply_rotary_pos_emb(qb, kb, cos, sin)
        torch.autograd.backward(ours, [dq, dk])
        torch.autograd.backward(theirs, [dq, dk])
        pairs = [(ours[0], theirs[0]), (ours[1], theirs[1]), (qa.grad, qb.grad), (ka.grad, kb.grad)]
        assert all(torch.isfinite(a).all() for a, _ in pairs)
        if dtype == torch.bfloat16:
            assert all(torch.equal(a, b) for a, b in pairs), [(a != b).float().mean().item() for a, b in pairs]
        else:
            q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
            r = reference.rope(q64, k64, cos.double(), sin.double())
            torch.autograd.backward(r, [dq.double(), dk.double()])
            for a, b in zip([*ours, qa.grad, ka.grad], [*r, q64.grad, k64.grad]):
                torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-6)
