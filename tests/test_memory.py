"""atlas_fast.memory on CPU: every memory option leaves losses and gradients as they were.

Checkpointing, activation offload, frozen-model offload, optimizer offload and packing are each
compared with the plain path on a tiny Qwen2 (tests/tiny.py), then all together through the
trainer. Without CUDA, "pinned CPU memory" is plain CPU memory and the device copies are fresh
CPU tensors: the bookkeeping (what is where between uses) is what these tests check; the
transfers themselves run on the GPU benchmark (benchmarks/bench_e2e.py).
"""
from __future__ import annotations

import copy
import warnings
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from atlas_kernels import reference as ref_kernels
from atlas_fast.batch import MicroBatch, completion_logits
from atlas_fast.memory import (OffloadedAdamW, StreamedAdamW, balance_rows, decoder_layers, enable_activation_checkpointing,
                               offload_frozen, on_device, pack, packed_completion_logits, prepare_packing,
                               split_micro_batches, supports_packing)
from atlas_fast.memory.checkpointing import attention_ops, disable_activation_checkpointing
from atlas_fast.memory.report import PhaseReport
from atlas_fast.memory.streamed import _pieces as _streamed_pieces
from tiny import char_tokenizer, tiny_model

TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds synchronisation
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def micro_batch(seed=0, prompt_lengths=(6, 3, 4, 1), completion_lengths=(7, 2, 0, 5), vocab=40) -> MicroBatch:
    """Left-padded prompts, right-padded completions of the given lengths (0: fully masked)."""
    g = torch.Generator().manual_seed(seed)
    B, P, C = len(prompt_lengths), max(prompt_lengths), max(completion_lengths)
    ids = torch.zeros(B, P + C, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (p, c) in enumerate(zip(prompt_lengths, completion_lengths)):
        ids[b, P - p : P + c] = torch.randint(3, vocab, (p + c,), generator=g)
        mask[b, P - p : P + c] = 1
    old = -torch.rand(B, C, generator=g)
    return MicroBatch(input_ids=ids, attention_mask=mask, completion_ids=ids[:, P:], completion_mask=mask[:, P:].bool(),
                      advantages=torch.randn(B, generator=g), old_logps=old, ref_logps=old - 0.1,
                      num_items=float(mask[:, P:].sum()))


def loss_and_grads(model, mb, logits_fn=completion_logits):
    model.zero_grad(set_to_none=True)
    logits = logits_fn(model, mb)
    loss, _ = ref_kernels.grpo_loss_from_logits(logits, mb.completion_ids, mb.old_logps, mb.ref_logps, mb.advantages,
                                                mb.completion_mask, beta=0.1, loss_type="dapo", num_items=mb.num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, **TOL)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], **TOL, msg=name)


# ---------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("offload", [False, True], ids=["checkpoint", "checkpoint+offload"])
def test_checkpointing_keeps_loss_and_gradients(tok, offload):
    model = tiny_model(tok, layers=2)
    mb = micro_batch()
    expected = loss_and_grads(model, mb)
    enable_activation_checkpointing(model, offload=offload)
    assert_same(loss_and_grads(model, mb), expected)


def test_checkpointing_saves_only_layer_inputs_and_offload_keeps_them_on_cpu(tok):
    model = tiny_model(tok, layers=3)
    mb = micro_batch()
    offloader = enable_activation_checkpointing(model, offload=True)
    calls = []
    for layer in decoder_layers(model):  # inside the layer: runs in the forward and in the recompute
        layer.mlp.register_forward_pre_hook(lambda m, a: calls.append(torch.is_grad_enabled()))
    logits = completion_logits(model, mb)
    stashed = offloader.stashed()
    # One hidden state per layer, held as a CPU copy that shares no memory with the live activations.
    assert len(stashed) == 3
    hidden = model.config.hidden_size
    assert all(t.device.type == "cpu" and t.shape == (*mb.input_ids.shape, hidden) for t in stashed)
    logits.float().sum().backward()
    assert offloader.stashed() == []  # each consumed by its layer's recompute
    assert len(calls) == 6  # forward, then the recompute in backward
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


class _CountOps(TorchDispatchMode):
    def __init__(self, ops):
        super().__init__()
        self.ops, self.calls = ops, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func in self.ops
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("offload", [False, True], ids=["keep", "keep+offload"])
def test_checkpointing_that_keeps_attention_runs_it_once_with_the_same_gradients(tok, offload):
    """An unpadded batch takes SDPA's fused CPU kernel: plain checkpointing runs it twice per layer
    (forward and recompute), keep_attention once, and the gradients do not change."""
    ids = torch.randint(3, 40, (3, 9), generator=torch.Generator().manual_seed(0))

    def run(model):
        model.zero_grad(set_to_none=True)
        counter = _CountOps(attention_ops())
        with counter:
            model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)[..., 7].mean().neg().backward()
        return counter.calls, {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, kept = tiny_model(tok, layers=3), tiny_model(tok, layers=3)
    enable_activation_checkpointing(plain)
    enable_activation_checkpointing(kept, offload=offload, keep_attention=True)
    plain_calls, plain_grads = run(plain)
    kept_calls, kept_grads = run(kept)
    assert plain_calls == 6 and kept_calls == 3
    for name, grad in plain_grads.items():
        assert torch.equal(grad, kept_grads[name]), name
    disable_activation_checkpointing(kept)
    assert run(kept)[0] == 3 and "_atlas_keep_attention" not in decoder_layers(kept)[0].__dict__


def test_keep_attention_recomputes_attention_with_dropout():
    """Attention with dropout draws random numbers: kept, it would shift the recompute's later masks."""
    from torch.utils.checkpoint import CheckpointPolicy

    from atlas_fast.memory.checkpointing import _keep_attention_policy

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    q = torch.zeros(1, 1, 2, 4)
    assert _keep_attention_policy(None, op, q, q, q) == CheckpointPolicy.MUST_SAVE
    assert _keep_attention_policy(None, op, q, q, q, 0.0, True) == CheckpointPolicy.MUST_SAVE
    assert _keep_attention_policy(None, op, q, q, q, 0.1) == CheckpointPolicy.PREFER_RECOMPUTE
    assert _keep_attention_policy(None, op, q, q, q, dropout_p=0.1) == CheckpointPolicy.PREFER_RECOMPUTE
    assert _keep_attention_policy(None, torch.ops.aten.mm.default, q, q) == CheckpointPolicy.PREFER_RECOMPUTE


def test_a_forward_that_fills_a_kv_cache_is_not_checkpointed(tok):
    """A recompute would append each layer's keys to the cache a second time (and attend over
    them): with a cache in the call, whatever transformers names it, the layers run plainly."""
    ids = torch.randint(3, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    plain, wrapped = tiny_model(tok, layers=2), tiny_model(tok, layers=2)
    enable_activation_checkpointing(wrapped, keep_attention=True)
    grads = []
    for model in (plain, wrapped):
        out = model(input_ids=ids, use_cache=True)
        out.logits.float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        cache = getattr(out, "cache", None) or out.past_key_values
        assert cache.get_seq_length() == ids.shape[1]  # filled once, not again by a recompute
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_checkpointing_is_skipped_without_grad_and_generation_still_works(tok):
    model = tiny_model(tok, layers=2)
    prompt = torch.tensor([[5, 6, 7]])
    expected = model.generate(prompt, max_new_tokens=5, do_sample=False)
    offloader = enable_activation_checkpointing(model, offload=True)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False), expected)
    assert offloader.stashed() == []


def test_deepcopy_of_a_checkpointed_model_runs_its_own_weights(tok):
    model = tiny_model(tok, layers=2)
    enable_activation_checkpointing(model, offload=True)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    ids = torch.tensor([[4, 5, 6, 7]])
    assert not torch.allclose(model(input_ids=ids).logits, twin(input_ids=ids).logits)
    layer = decoder_layers(twin)[0]
    assert layer._atlas_inner_forward.__self__ is layer


def test_checkpointing_finds_layers_under_peft(tok):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model(tok, layers=2), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"))
    mb = micro_batch()
    expected = loss_and_grads(model, mb)
    assert len(decoder_layers(model)) == 2
    enable_activation_checkpointing(model, offload=True)
    assert_same(loss_and_grads(model, mb), expected)


def test_model_without_a_layer_list_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot find the decoder layers of Linear"):
        enable_activation_checkpointing(torch.nn.Linear(3, 3))


# ---------------------------------------------------------------------- frozen-model offload
@pytest.mark.parametrize("mode", ["layer", "model", "auto"])
def test_offloaded_frozen_model_gives_the_same_outputs_and_stays_on_cpu(tok, mode):
    model = tiny_model(tok, layers=3)
    twin = copy.deepcopy(model)
    mb = micro_batch()
    with torch.no_grad():
        expected = completion_logits(model, mb)
    offload = offload_frozen(twin, "cpu", mode=mode)
    resident = []  # device tensors while the middle layer runs
    decoder_layers(twin)[1].register_forward_pre_hook(lambda m, a: resident.append(offload.on_device_tensors()))
    total = sum(1 for _ in twin.parameters()) + sum(1 for _ in twin.buffers())
    with torch.no_grad():
        torch.testing.assert_close(completion_logits(twin, mb), expected, rtol=0, atol=0)
        assert offload.on_device_tensors() == 0  # between uses everything is back in CPU memory
        with on_device(twin, torch.device("cpu")):
            torch.testing.assert_close(completion_logits(twin, mb), expected, rtol=0, atol=0)
        assert offload.on_device_tensors() == 0
        with on_device(twin, torch.device("cpu"), forwards=1):
            torch.testing.assert_close(completion_logits(twin, mb), expected, rtol=0, atol=0)
        assert offload.on_device_tensors() == 0
    per_layer = sum(1 for _ in decoder_layers(twin)[0].parameters())
    streamed = total - 2 * per_layer  # that layer and the non-layer weights (embeddings, norm, rotary)
    if mode == "layer":
        assert resident == [streamed] * 3
    elif mode == "model":
        assert resident == [total] * 3
    else:  # auto: streamed per call and for a one-forward visit, wholesale for a visit of unknown size
        assert resident == [streamed, total, streamed]
    assert all(not p.requires_grad for p in twin.parameters())


def test_offloaded_home_copy_takes_in_place_updates(tok):
    # The reference model's EMA sync writes into the weights between forwards.
    model = tiny_model(tok, layers=2)
    offload_frozen(model, "cpu", mode="layer")
    ids = torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        for p in model.parameters():
            p.mul_(0.5)
        after = model(input_ids=ids).logits
    assert not torch.allclose(before, after)


def test_impossible_offload_is_a_clear_error(tok):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            offload_frozen(tiny_model(tok), "cuda")
    with pytest.raises(ValueError, match="cannot find the decoder layers"):
        offload_frozen(torch.nn.Sequential(torch.nn.Linear(2, 2)), "cpu", mode="layer")
    with pytest.raises(ValueError, match="offload mode must be one of"):
        offload_frozen(tiny_model(tok), "cpu", mode="sometimes")
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        offload_frozen(object(), "cpu")
    # A model without a layer list can still move wholesale.
    small = offload_frozen(torch.nn.Sequential(torch.nn.Linear(2, 2)), "cpu", mode="auto")
    assert small.mode == "model"


# ---------------------------------------------------------------------- optimizer offload
def _train(model, optimizer, steps, g):
    for _ in range(steps):
        ids = torch.randint(3, 40, (3, 7), generator=g)
        model(input_ids=ids).logits.float().log_softmax(-1)[..., 5].mean().neg().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_optimizer_offload_gives_the_same_parameters(tok):
    plain, offloaded = tiny_model(tok, layers=2), tiny_model(tok, layers=2)
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    # The same CPU kernel as the offloaded step: Adam divides by sqrt(v), so a parameter whose
    # gradient is rounding noise (k_proj's bias: softmax ignores it) differs by up to lr between
    # two kernels that round differently, which would hide a real difference.
    _train(plain, torch.optim.AdamW(plain.parameters(), **hyper, fused=True), 3, torch.Generator().manual_seed(0))
    opt = OffloadedAdamW(offloaded.parameters(), **hyper, chunk_bytes=4096)  # several pipelined chunks
    assert len(opt._chunks) > 1
    _train(offloaded, opt, 3, torch.Generator().manual_seed(0))
    for (name, a), b in zip(plain.named_parameters(), offloaded.parameters()):
        assert torch.equal(a, b), name
    # The moments and master weights are CPU fp32 tensors, separate from the model's.
    state = opt.state[opt.masters[0]]
    assert state["exp_avg"].device.type == "cpu" and state["exp_avg"].dtype == torch.float32
    assert opt.masters[0].data_ptr() != next(offloaded.parameters()).data_ptr()


def test_optimizer_offload_resume_is_exact(tok, tmp_path):
    hyper = dict(lr=1e-2, weight_decay=0.1, chunk_bytes=4096)
    straight = tiny_model(tok, layers=2)
    _train(straight, OffloadedAdamW(straight.parameters(), **hyper), 4, torch.Generator().manual_seed(0))

    first = tiny_model(tok, layers=2)
    opt = OffloadedAdamW(first.parameters(), **hyper)
    batches = torch.Generator().manual_seed(0)
    _train(first, opt, 2, batches)
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    second = tiny_model(tok, seed=1, layers=2)  # other weights: everything must come from the checkpoint
    second.load_state_dict(saved["model"])
    opt2 = OffloadedAdamW(second.parameters(), **hyper)
    opt2.load_state_dict(saved["optimizer"])
    _train(second, opt2, 2, batches)  # the remaining two steps of the same stream of batches
    for (name, a), b in zip(straight.named_parameters(), second.parameters()):
        assert torch.equal(a, b), name


def test_optimizer_offload_keeps_bf16_weights_and_fp32_masters(tok):
    model = tiny_model(tok, layers=1)
    fp32 = [p.detach().clone() for p in model.parameters()]
    opt = OffloadedAdamW(model.parameters(), lr=1e-3, weight_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(torch.equal(m, w) for m, w in zip(opt.masters, fp32))  # no precision lost in the masters
    with pytest.raises(ValueError, match="no parameters that require grad"):
        OffloadedAdamW(model.requires_grad_(False).parameters())


def _adamw_pair(tok, **hyper):
    plain, streamed = tiny_model(tok, layers=2), tiny_model(tok, layers=2)
    opt = StreamedAdamW(streamed.parameters(), **hyper, chunk_bytes=1024)
    return plain, torch.optim.AdamW(plain.parameters(), **hyper, fused=True), streamed, opt


def test_streamed_adamw_steps_exactly_as_fused_adamw(tok):
    """Moments in host memory, parameters stepped in flat slices of at most 512 bytes of moments:
    the same kernel on the same numbers, so the weights match the default optimizer bit for bit."""
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    plain, plain_opt, streamed, opt = _adamw_pair(tok, **hyper)
    _train(plain, plain_opt, 3, torch.Generator().manual_seed(0))
    _train(streamed, opt, 3, torch.Generator().manual_seed(0))
    for (name, a), b in zip(plain.named_parameters(), streamed.parameters()):
        assert torch.equal(a, b), name
    embed = streamed.get_input_embeddings().weight
    for p in opt.state:
        p.grad = torch.zeros_like(p)  # the layout of a step's slices needs gradients to slice
    pieces = _streamed_pieces(list(opt.state), list(opt.state.values()), 512)
    storage = embed.untyped_storage().data_ptr()
    assert sum(piece[0].untyped_storage().data_ptr() == storage for chunk in pieces for piece in chunk) > 1
    for p, state in opt.state.items():
        assert state["exp_avg"].device.type == "cpu" and state["exp_avg"].dtype == p.dtype
        assert state["exp_avg"].data_ptr() != p.data_ptr()
        assert int(state["step"]) == 3
        torch.testing.assert_close(state["exp_avg_sq"], plain_opt.state[dict(zip(streamed.parameters(),
                                   plain.parameters()))[p]]["exp_avg_sq"], rtol=0, atol=0)


def test_streamed_adamw_skips_parameters_without_gradients(tok):
    model = tiny_model(tok, layers=1)
    frozen = model.get_input_embeddings().weight
    before = frozen.detach().clone()
    opt = StreamedAdamW(model.parameters(), lr=1e-2, chunk_bytes=1024)
    model.zero_grad(set_to_none=True)
    ids = torch.randint(3, 40, (2, 5))
    model(input_ids=ids).logits.float().mean().backward()
    frozen.grad = None  # as if it took no part in the loss
    opt.step()
    assert torch.equal(frozen, before) and frozen not in opt.state
    with pytest.raises(ValueError, match="no parameters that require grad"):
        StreamedAdamW(model.requires_grad_(False).parameters())
    with pytest.raises(ValueError, match="chunk_bytes must be >= 512"):
        StreamedAdamW(tiny_model(tok, layers=1).parameters(), chunk_bytes=100)


def test_streamed_adamw_steps_mixed_dtypes_and_respects_the_grad_scaler():
    """Parameters of two dtypes step as torch's fused AdamW steps them (one kernel per dtype), and
    a GradScaler that found an overflow skips the step."""
    g = torch.Generator().manual_seed(0)
    shapes = [((7, 5), torch.float32), ((300,), torch.bfloat16), ((3, 129), torch.float32), ((64,), torch.bfloat16)]
    init = [torch.randn(shape, generator=g).to(dtype) for shape, dtype in shapes]
    plain = [torch.nn.Parameter(t.clone()) for t in init]
    streamed = [torch.nn.Parameter(t.clone()) for t in init]
    plain_opt = torch.optim.AdamW(plain, lr=1e-2, weight_decay=0.1, fused=True)
    opt = StreamedAdamW(streamed, lr=1e-2, weight_decay=0.1, chunk_bytes=1024)
    for _ in range(3):
        grads = [torch.randn(t.shape, generator=g).to(t.dtype) for t in init]
        for params, o in ((plain, plain_opt), (streamed, opt)):
            for p, grad in zip(params, grads):
                p.grad = grad.clone()
            o.step()
    for a, b in zip(plain, streamed):
        assert torch.equal(a, b)
    before = [p.detach().clone() for p in streamed]
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))  # the scale exists from the first scaled loss on
    for p in streamed:
        p.grad = torch.full_like(p, float("inf"))
    scaler.unscale_(opt)
    scaler.step(opt)
    assert all(torch.equal(a, b) for a, b in zip(before, streamed))


def test_streamed_adamw_takes_parameter_groups(tok):
    """Groups (a no-decay group, say) step as torch's fused AdamW steps them."""
    def groups(model):
        decay = [p for n, p in model.named_parameters() if p.dim() > 1]
        rest = [p for n, p in model.named_parameters() if p.dim() <= 1]
        return [{"params": decay}, {"params": rest, "weight_decay": 0.0, "lr": 3e-2}]

    plain, streamed = tiny_model(tok, layers=2), tiny_model(tok, layers=2)
    plain_opt = torch.optim.AdamW(groups(plain), lr=1e-2, weight_decay=0.1, fused=True)
    opt = StreamedAdamW(groups(streamed), lr=1e-2, weight_decay=0.1, chunk_bytes=1024)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    _train(plain, plain_opt, 2, torch.Generator().manual_seed(0))
    _train(streamed, opt, 2, torch.Generator().manual_seed(0))
    for (name, a), b in zip(plain.named_parameters(), streamed.parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="runs on CUDA or the CPU, not on meta"):
        StreamedAdamW([torch.nn.Parameter(torch.zeros(3, device="meta"))])


def test_streamed_adamw_checkpoints_load_both_ways(tok, tmp_path):
    """A StreamedAdamW checkpoint resumes exactly, and is a plain AdamW checkpoint: each loads the other's."""
    hyper = dict(lr=1e-2, weight_decay=0.1)
    straight = tiny_model(tok, layers=2)
    _train(straight, torch.optim.AdamW(straight.parameters(), **hyper, fused=True), 4, torch.Generator().manual_seed(0))
    for first_kind, second_kind in (("streamed", "plain"), ("plain", "streamed"), ("streamed", "streamed")):
        def make(kind, model):
            if kind == "plain":
                return torch.optim.AdamW(model.parameters(), **hyper, fused=True)
            return StreamedAdamW(model.parameters(), **hyper, chunk_bytes=1024)

        first = tiny_model(tok, layers=2)
        batches = torch.Generator().manual_seed(0)
        opt = make(first_kind, first)
        _train(first, opt, 2, batches)
        torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
        saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
        second = tiny_model(tok, seed=1, layers=2)
        second.load_state_dict(saved["model"])
        opt2 = make(second_kind, second)
        opt2.load_state_dict(saved["optimizer"])
        if second_kind == "streamed":
            assert all(s["exp_avg"].device.type == "cpu" for s in opt2.state.values())
            assert all(g["fused"] for g in opt2.param_groups)
        _train(second, opt2, 2, batches)
        for (name, a), b in zip(straight.named_parameters(), second.parameters()):
            assert torch.equal(a, b), f"{first_kind} -> {second_kind}: {name}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the streamed path needs CUDA streams")
def test_streamed_adamw_on_cuda_matches_fused_adamw(tok, monkeypatch):
    """On CUDA, with a float32 parameter among bf16 ones and each chunk's step held back on the GPU
    (so an upload or download that does not wait for it reads or writes the wrong moments)."""
    import atlas_fast.memory.streamed as streamed_module

    torch.manual_seed(0)
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    plain, streamed = tiny_model(tok, layers=2).cuda().bfloat16(), tiny_model(tok, layers=2).cuda().bfloat16()
    extra = torch.randn(1000, device="cuda")  # a float32 parameter among the bf16 ones, its gradient made up
    extras = [torch.nn.Parameter(extra.clone()), torch.nn.Parameter(extra.clone())]
    plain_opt = torch.optim.AdamW([*plain.parameters(), extras[0]], **hyper, fused=True)
    opt = StreamedAdamW([*streamed.parameters(), extras[1]], **hyper, chunk_bytes=4096)  # many chunks, two slots
    step_chunk = streamed_module._adamw

    def slow_step(chunk, ms, vs, hyper):
        torch.cuda._sleep(2_000_000)  # ~1 ms of GPU time before the chunk's step
        step_chunk(chunk, ms, vs, hyper)

    monkeypatch.setattr(streamed_module, "_adamw", slow_step)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(3, 40, (3, 7), generator=g).cuda()
        grad = torch.randn(1000, generator=g).cuda()
        for model, o, x in ((plain, plain_opt, extras[0]), (streamed, opt, extras[1])):
            model(input_ids=ids).logits.float().log_softmax(-1)[..., 5].mean().neg().backward()
            x.grad = grad.clone()
            o.step()
            o.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    for (name, a), b in zip(plain.named_parameters(), streamed.parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(extras[0], extras[1])
    state = opt.state_dict()["state"]
    assert all(s["exp_avg"].is_pinned() for s in state.values())
    # Loading puts the moments straight into host memory: the GPU holds no copy of them on the way.
    fresh = StreamedAdamW([*streamed.parameters(), extras[1]], **hyper, chunk_bytes=4096)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fresh.load_state_dict(opt.state_dict())
    moment_bytes = sum(p.numel() * p.element_size() for p in streamed.parameters())
    assert torch.cuda.max_memory_allocated() - before < moment_bytes / 2
    assert all(s["exp_avg"].is_pinned() for s in fresh.state.values())


# ---------------------------------------------------------------------- packing
def test_pack_layout():
    mb = micro_batch(prompt_lengths=(2, 1), completion_lengths=(2, 3))
    packed = pack(mb)
    assert packed.input_ids.shape == (1, 8)
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert packed.cu_seqlens.tolist() == [0, 4, 8] and packed.max_seqlen == 4
    # Completion token j of row b is scored at the packed position before it; padding and the last
    # column (which scores nothing, as in the padded layout) read 0.
    assert packed.index.tolist() == [[1, 2, 0, 0], [4, 5, 6, 0]]
    assert torch.equal(packed.input_ids[0, 2:4], mb.completion_ids[0, :2])


@pytest.mark.parametrize("varlen,attention,impl", [(False, "varlen", "sdpa"), (True, "varlen", "atlas_varlen"),
                                                   (None, "sequences", "atlas_sequences"), (True, "auto", "atlas_packed"),
                                                   (None, "auto", "sdpa")],
                         ids=["transformers-mask", "atlas_varlen", "atlas_sequences", "atlas_packed", "auto-on-cpu"])
def test_packing_keeps_loss_and_gradients(tok, varlen, attention, impl):
    model = tiny_model(tok, layers=2)
    mb = micro_batch()
    expected = loss_and_grads(model, mb)
    assert prepare_packing(model, varlen=varlen, attention=attention)
    assert model.config._attn_implementation == impl
    assert_same(loss_and_grads(model, mb, packed_completion_logits), expected)
    with torch.no_grad():
        padded, packed = completion_logits(model, mb), packed_completion_logits(model, mb)
    C = mb.completion_ids.shape[1]
    assert packed.shape == padded.shape == (len(mb.advantages), C + 1, model.config.vocab_size)
    mask = mb.completion_mask
    torch.testing.assert_close(packed[:, :C][mask], padded[:, :C][mask], **TOL)


@pytest.mark.parametrize("min_mean,branch", [(1, "_sequences_packed"), (10**6, "_varlen_packed")])
def test_auto_packed_attention_picks_by_mean_sequence_length(tok, monkeypatch, min_mean, branch):
    from atlas_fast.memory import packing

    model = tiny_model(tok, layers=2)
    mb = micro_batch(seed=5)
    expected = loss_and_grads(model, mb)
    assert prepare_packing(model, varlen=True, attention="auto")
    monkeypatch.setattr(packing, "AUTO_SEQUENCES_MIN_MEAN", min_mean)
    calls = []
    for name in ("_sequences_packed", "_varlen_packed"):
        def spy(*args, _real=getattr(packing, name), _name=name):
            calls.append(_name)
            return _real(*args)
        monkeypatch.setattr(packing, name, spy)
    assert_same(loss_and_grads(model, mb, packed_completion_logits), expected)
    assert calls and set(calls) == {branch}


def test_packing_with_checkpointing_and_offload(tok):
    model = tiny_model(tok, layers=2)
    mb = micro_batch(seed=3)
    expected = loss_and_grads(model, mb)
    prepare_packing(model, varlen=True)
    enable_activation_checkpointing(model, offload=True)
    assert_same(loss_and_grads(model, mb, packed_completion_logits), expected)


def test_varlen_model_still_generates_padded_batches(tok):
    model = tiny_model(tok, layers=2)
    prompts = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = (prompts != 0).long()
    expected = model.generate(prompts, attention_mask=mask, max_new_tokens=4, do_sample=False)
    prepare_packing(model, varlen=True)
    assert torch.equal(model.generate(prompts, attention_mask=mask, max_new_tokens=4, do_sample=False), expected)


def test_models_that_cannot_pack_are_reported():
    class Custom(torch.nn.Module):  # not a transformers model: how it reads position ids is unknown
        def forward(self, input_ids):
            return input_ids

    assert not supports_packing(Custom())
    with pytest.warns(UserWarning, match="keeps padded batches"):
        assert not prepare_packing(Custom())


def test_packed_hidden_states_match_the_padded_body(tok):
    import atlas_fast.batch as batch

    if not hasattr(batch, "split_lm_head"):
        pytest.skip("no hidden-state path in atlas_fast.batch")
    from atlas_fast.memory import packed_completion_hidden

    model = tiny_model(tok, layers=2)
    mb = micro_batch(seed=5)
    head = batch.split_lm_head(model)
    with torch.no_grad():
        padded = batch.completion_hidden(head, mb)
        prepare_packing(model, varlen=True)
        packed = packed_completion_hidden(head, mb)
    assert packed.shape == padded.shape
    mask = mb.completion_mask
    C = mask.shape[1]
    torch.testing.assert_close(packed[:, :C][mask], padded[:, :C][mask], **TOL)


def test_balance_rows_by_tokens():
    lengths = [100, 10, 90, 20, 80, 30, 70, 40]
    groups = balance_rows(lengths, 4)
    assert sorted(r for g in groups for r in g) == list(range(8))
    assert all(len(g) == 2 for g in groups)
    totals = [sum(lengths[r] for r in g) for g in groups]
    assert max(totals) - min(totals) <= 20  # consecutive slices would give 110, 110, 110, 110 here too,
    skewed = [100, 90, 80, 70, 10, 10, 10, 10]  # but here they give 190, 150, 20, 20
    totals = [sum(skewed[r] for r in g) for g in balance_rows(skewed, 4)]
    assert max(totals) == 110 and min(totals) == 80
    with pytest.raises(ValueError, match="equal size"):
        balance_rows([1, 2, 3], 2)


def test_balanced_split_keeps_every_row_once():
    mb = micro_batch(prompt_lengths=(5, 4, 1, 2), completion_lengths=(7, 6, 1, 2))
    parts = split_micro_batches(mb, 2, balance=True)
    assert [len(p.advantages) for p in parts] == [2, 2]
    assert sorted(torch.cat([p.advantages for p in parts]).tolist()) == sorted(mb.advantages.tolist())
    assert [int(p.attention_mask.sum()) for p in parts] == [14, 14]  # consecutive: 22 and 6
    plain = split_micro_batches(mb, 2, balance=False)
    assert torch.equal(plain[0].input_ids, mb.input_ids[:2])


# ---------------------------------------------------------------------- memory report
def test_phase_report_on_cpu_times_phases_and_reports_no_peaks():
    report = PhaseReport("cpu")
    for pause in (0.01, 0.02):  # a phase entered twice adds up its time
        with report.phase("update"):
            time.sleep(pause)
    with report.phase("optimizer"):
        pass
    metrics = report.metrics()
    assert set(metrics) == {"time/update_s", "time/optimizer_s"}
    assert metrics["time/update_s"] >= 0.03 and metrics["time/optimizer_s"] >= 0
    assert report.metrics() == {}  # collected: the next step starts over


# ---------------------------------------------------------------------- through the trainer
def _fixed_rollout(prompts, trainer):
    """Completions of 1-6 tokens that differ within each group, some ending in EOS: ragged rows."""
    out = []
    for i, prompt in enumerate(prompts):
        k = i % trainer.args.num_generations
        ids = trainer.tokenizer("12ab34"[: 1 + (k + len(str(prompt))) % 6], add_special_tokens=False)["input_ids"]
        out.append(ids + ([trainer.tokenizer.eos_token_id] if k % 2 == 0 else []))
    return out


def _trainer(tmp_path, tok, name, **overrides):
    from atlas_fast import GRPOConfig, GRPOTrainer
    from tiny import arithmetic_rows

    values = dict(output_dir=str(tmp_path / name), max_steps=2, num_generations=4, per_device_train_batch_size=4,
                  gradient_accumulation_steps=2, max_completion_length=6, learning_rate=1e-2,
                  lr_scheduler_type="constant", seed=0, use_kernels=False, disable_tqdm=True, beta=0.1,
                  rollout_func=_fixed_rollout, report_to="none")
    values.update(overrides)
    return GRPOTrainer(GRPOConfig(**values), model=tiny_model(tok, layers=2), tokenizer=tok,
                       train_dataset=arithmetic_rows(16), reward_funcs=[lambda completion_ids, **kw: [
                           sum(t % 3 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]])


def assert_same_run(expected_run, run, keys=("loss", "grad_norm", "kl")) -> None:
    """Two trainers' runs agree: the logged metrics of both steps and the trained weights."""
    for key in keys:
        expected = [r[key] for r in expected_run.state.log_history if key in r]
        got = [r[key] for r in run.state.log_history if key in r]
        assert len(got) == len(expected) == 2, key
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-4, atol=1e-6, msg=key)
    for (name, a), b in zip(expected_run.model.named_parameters(), run.model.parameters()):
        if name.endswith("k_proj.bias"):
            continue  # softmax ignores it: its gradient is rounding noise that Adam scales up to lr
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


ALL_OPTIONS = dict(gradient_checkpointing=True, activation_offload=True, offload_untrained_models=True,
                   optimizer_offload=True, padding_free=True)


def test_trainer_with_every_memory_option_matches_the_plain_run(tmp_path, tok):
    plain = _trainer(tmp_path, tok, "plain")
    plain.train()
    lean = _trainer(tmp_path, tok, "lean", **ALL_OPTIONS)
    assert lean.ref_model is not None and all(p.device.type == "cpu" for p in lean.ref_model.parameters())
    lean.train()
    assert_same_run(plain, lean)


def test_trainer_with_every_memory_option_and_fused_decoder_layers_matches_the_plain_run(tmp_path, tok):
    """The fused decoder nodes inside every memory option: the policy's recomputed from offloaded
    inputs, the frozen reference's run through the offload's layer hooks."""
    plain = _trainer(tmp_path, tok, "plain")
    plain.train()
    lean = _trainer(tmp_path, tok, "lean-fused", **ALL_OPTIONS, fused_layers=True)
    assert all("_atlas_fused_decoder" in layer.__dict__ for model in (lean.model, lean.ref_model)
               for layer in decoder_layers(model))
    lean.train()
    assert_same_run(plain, lean)


def test_trainer_with_streamed_optimizer_state_matches_the_plain_run(tmp_path, tok):
    """optimizer_state_offload with the other memory options: the same run as the plain trainer's."""
    plain = _trainer(tmp_path, tok, "plain")
    plain.train()
    lean = _trainer(tmp_path, tok, "streamed", **{**ALL_OPTIONS, "optimizer_offload": False,
                                                  "optimizer_state_offload": True})
    assert isinstance(lean.optimizer, StreamedAdamW)
    lean.train()
    assert_same_run(plain, lean)
    assert all(s["exp_avg"].device.type == "cpu" for s in lean.optimizer.state.values())


def test_trainer_with_per_sequence_packed_attention_matches_the_plain_run(tmp_path, tok):
    plain = _trainer(tmp_path, tok, "plain")
    plain.train()
    packed = _trainer(tmp_path, tok, "sequences", padding_free=True, packed_attention="sequences")
    assert packed.model.config._attn_implementation == "atlas_sequences"
    assert packed.ref_model.config._attn_implementation == "atlas_sequences"
    packed.train()
    assert_same_run(plain, packed)


def test_per_sequence_attention_backward_writes_no_row_sized_zeros():
    """Each sequence's gradient lands in one concatenation, not in a zero-filled copy of the row per
    sequence (what slicing would cost: S fills and S - 1 adds of the row per tensor and layer)."""
    from atlas_fast.memory.packing import sequences_attention_forward

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=g, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 3, 7, 12], dtype=torch.int32)
    out, _ = sequences_attention_forward(torch.nn.Module(), q, k, v, None, cu_seq_lens_q=cu, max_length_q=5)
    ops = Ops()
    with ops:
        out.sum().backward()
    assert not [n for n in ops.names if n.startswith(("slice_backward", "zeros", "fill", "new_zeros"))], ops.names
    expected = []
    for a, b in ((0, 3), (3, 7), (7, 12)):
        expected.append(torch.nn.functional.scaled_dot_product_attention(
            q[:, :, a:b].detach().double(), k[:, :, a:b].detach().double(), v[:, :, a:b].detach().double(), is_causal=True))
    torch.testing.assert_close(out.double(), torch.cat(expected, dim=2).transpose(1, 2), rtol=1e-5, atol=1e-5)
    # Empty entries in the boundaries (a caller's padding of cu_seqlens) change nothing.
    padded, _ = sequences_attention_forward(torch.nn.Module(), q, k, v, None, max_length_q=5,
                                            cu_seq_lens_q=torch.tensor([0, 3, 3, 7, 12, 12], dtype=torch.int32))
    torch.testing.assert_close(padded, out, rtol=0, atol=0)


def test_any_sliding_layer_kind_keeps_attention_stock(tok):
    from atlas_fast.memory.packing import _has_sliding_window

    model = tiny_model(tok, layers=2)
    assert not _has_sliding_window(model.config)
    model.config.layer_types = ["full_attention", "hybrid_sliding"]
    assert _has_sliding_window(model.config)


def test_sequence_bounds_are_read_from_the_device_once_per_tensor():
    from atlas_fast.memory.packing import _HOST_BOUNDS, _host_bounds

    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    assert _host_bounds(cu) == [0, 3, 7]
    cu[1] = 5  # a cached tensor is not read again (each forward packs a fresh one)
    assert _host_bounds(cu) == [0, 3, 7]
    assert _host_bounds(torch.tensor([0, 5, 7], dtype=torch.int32)) == [0, 5, 7]
    del cu
    assert all(bounds != [0, 3, 7] for _, bounds in _HOST_BOUNDS.values())


def test_trainer_that_keeps_attention_matches_the_plain_run(tmp_path, tok):
    plain = _trainer(tmp_path, tok, "plain")
    plain.train()
    kept = _trainer(tmp_path, tok, "kept", gradient_checkpointing=True, checkpoint_keep_attention=True)
    assert all(layer._atlas_keep_attention for layer in decoder_layers(kept.model))
    kept.train()
    assert_same_run(plain, kept)


@pytest.mark.parametrize("rotary", [False, True], ids=["norms-mlps", "and-rotary"])
def test_trainer_with_fused_layers_matches_the_plain_run(tmp_path, tok, rotary):
    """fused_layers swaps the policy's (and its reference copy's) norms and SwiGLU for the fused
    kernels, fused_rotary its rotary embeddings too: the logged losses, KL and gradient norms and
    the trained weights stay the plain run's."""
    plain = _trainer(tmp_path, tok, "plain", gradient_checkpointing=True)
    plain.train()
    fused = _trainer(tmp_path, tok, "fused", gradient_checkpointing=True, fused_layers=True, fused_rotary=rotary)
    assert all("forward" in m.__dict__ for m in (fused.model.model.norm, fused.ref_model.model.norm))
    assert fused.ref_model.model.norm.forward.__self__ is fused.ref_model.model.norm
    attentions = [m for model in (fused.model, fused.ref_model) for m in model.modules()
                  if type(m).__name__.endswith("Attention")]
    assert attentions and all(("forward" in m.__dict__) == rotary for m in attentions)
    # each decoder layer one autograd node (fused_decoder, on by default), the reference's too; it
    # rotates with our kernel, so not where fused_rotary is off
    assert all(("_atlas_fused_decoder" in layer.__dict__) == rotary for model in (fused.model, fused.ref_model)
               for layer in decoder_layers(model))
    fused.train()
    assert_same_run(plain, fused)


@pytest.mark.parametrize("loss_type,padding_free", [("grpo", True), ("bnpo", False), ("dr_grpo", True),
                                                    ("dapo", False)])
def test_forward_token_budget_keeps_losses_and_updates(tmp_path, tok, loss_type, padding_free):
    """max_forward_tokens runs each micro-batch (and the old/reference log-prob passes) in row chunks:
    the logged losses, KL, gradient norms and the trained weights equal whole micro-batches'."""
    options = dict(loss_type=loss_type, padding_free=padding_free, num_iterations=2)
    whole = _trainer(tmp_path, tok, "whole", **options)
    whole.train()
    chunked = _trainer(tmp_path, tok, "chunked", max_forward_tokens=12, **options)
    splits = []
    real = chunked._row_chunks
    chunked._row_chunks = lambda mb: splits.append(len(real(mb))) or real(mb)
    chunked.train()
    assert max(splits) >= 3  # micro-batches of 4 rows of ~6-14 tokens really were split
    assert_same_run(whole, chunked, keys=("loss", "grad_norm", "kl", "clip_ratio/region_mean"))


def test_token_chunks_respect_the_budget():
    from atlas_fast.memory import token_chunks

    prompts, completions = [3, 4, 1, 6, 2, 2], [2, 5, 2, 6, 2, 2]  # rows of 5, 9, 3, 12, 4, 4 tokens
    packed = token_chunks(prompts, completions, 12, packed=True)
    assert [list(c) for c in packed] == [[0], [1, 2], [3], [4, 5]]
    padded = token_chunks(prompts, completions, 12, packed=False)
    assert [list(c) for c in padded] == [[0], [1], [2], [3], [4, 5]]
    assert [list(c) for c in token_chunks(prompts, completions, 100, packed=True)] == [list(range(6))]
    assert [list(c) for c in token_chunks([20, 1], [10, 1], 8, packed=True)] == [[0], [1]]  # a long row goes alone
    # Padded, the trimmed width is the longest prompt plus the longest completion, which may come
    # from different rows: two rows of 7 tokens (6 + 1 and 1 + 6) are 2 x 12 = 24 tokens wide.
    assert [list(c) for c in token_chunks([6, 1], [1, 6], 14, packed=False)] == [[0], [1]]
    assert [list(c) for c in token_chunks([6, 1], [1, 6], 14, packed=True)] == [[0, 1]]
    with pytest.raises(ValueError, match="token budget must be >= 1"):
        token_chunks(prompts, completions, 0, packed=True)


@pytest.mark.parametrize("flag", ["optimizer_offload", "optimizer_state_offload"])
def test_trainer_resume_with_optimizer_offload_is_exact(tmp_path, tok, flag):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    options = {"max_steps": 4, flag: True, "padding_free": True}
    straight = _trainer(tmp_path, tok, "straight", **options)
    straight.train()
    first = _trainer(tmp_path, tok, "resumed", save_steps=2, **options)
    first.callbacks.append(StopAt())
    first.train()
    second = _trainer(tmp_path, tok, "resumed", save_steps=2, **options)
    second.train(resume_from_checkpoint=True)
    assert second.state.global_step == 4
    for (name, a), b in zip(straight.model.named_parameters(), second.model.parameters()):
        assert torch.equal(a, b), name
    if flag == "optimizer_offload":
        masters = second.optimizer.masters
        assert all(torch.equal(m, s) for m, s in zip(masters, straight.optimizer.masters))
    else:
        for run in (straight, second):
            run.optimizer.synchronize()
        moments = [(s["exp_avg"], s["exp_avg_sq"]) for s in second.optimizer.state.values()]
        assert all(m.device.type == "cpu" for pair in moments for m in pair)
        assert all(torch.equal(a, b) for pa, pb in zip(moments, [(s["exp_avg"], s["exp_avg_sq"]) for s in
                   straight.optimizer.state.values()]) for a, b in zip(pa, pb))


def test_impossible_memory_options_are_clear_errors(tmp_path, tok):
    from atlas_fast import GRPOConfig

    with pytest.raises(ValueError, match="activation_offload .* set gradient_checkpointing=True"):
        GRPOConfig(activation_offload=True)
    with pytest.raises(ValueError, match="checkpoint_keep_attention .* set gradient_checkpointing=True"):
        GRPOConfig(checkpoint_keep_attention=True)
    with pytest.raises(ValueError, match="offload_mode must be one of"):
        GRPOConfig(offload_mode="always")
    with pytest.raises(ValueError, match="optimizer_offload does not combine with fp16"):
        GRPOConfig(optimizer_offload=True, fp16=True)
    with pytest.raises(ValueError, match="optimizer_offload and optimizer_state_offload are two optimizers"):
        GRPOConfig(optimizer_offload=True, optimizer_state_offload=True)
    with pytest.raises(ValueError, match="max_forward_tokens must be >= 1"):
        GRPOConfig(max_forward_tokens=0)
    from atlas_fast import GRPOTrainer
    from tiny import arithmetic_rows

    model = tiny_model(tok)
    with pytest.raises(ValueError, match="optimizer_offload builds its own AdamW"):
        GRPOTrainer(GRPOConfig(output_dir=str(tmp_path / "x"), optimizer_offload=True, num_generations=4,
                               per_device_train_batch_size=4, disable_tqdm=True),
                    model=model, tokenizer=tok, train_dataset=arithmetic_rows(4), reward_funcs=["format"],
                    optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))


@pytest.mark.parametrize("mode", ["layer", "model"])
def test_offloaded_model_runs_its_body_and_head_apart_inside_a_visit(tok, mode):
    # The fused linear head calls the decoder body, then applies the head's weight itself.
    import atlas_fast.batch as batch

    if not hasattr(batch, "split_lm_head"):
        pytest.skip("no hidden-state path in atlas_fast.batch")
    model = tiny_model(tok, layers=3)
    twin = copy.deepcopy(model)
    mb = micro_batch(seed=7)
    with torch.no_grad():
        expected = batch.completion_hidden(batch.split_lm_head(model), mb) @ model.lm_head.weight.T
        offload = offload_frozen(twin, "cpu", mode=mode)
        head = batch.split_lm_head(twin)
        with on_device(twin, torch.device("cpu")):
            got = batch.completion_hidden(head, mb) @ head.weight.T
        assert offload.on_device_tensors() == 0
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_per_sequence_packing_names_what_it_cannot_do(tok):
    model = tiny_model(tok, layers=1)
    model.config.use_sliding_window = True
    with pytest.warns(UserWarning, match="packed_attention='sequences' needs an sdpa/eager model without sliding-window"):
        assert prepare_packing(model, varlen=False, attention="sequences")
    assert model.config._attn_implementation == "sdpa"
    plain = tiny_model(tok, layers=1)
    assert prepare_packing(plain, attention="sequences")
    twin = copy.deepcopy(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a copy of a prepared model is prepared: no warning
        assert prepare_packing(twin, attention="sequences")
    assert twin.config._attn_implementation == "atlas_sequences"
    with pytest.raises(ValueError, match="packed attention must be one of"):
        prepare_packing(plain, attention="flash")


def test_same_device_reads_an_unindexed_gpu_as_the_current_one():
    from atlas_fast.memory import same_device

    assert same_device(torch.device("cpu"), torch.device("cpu"))
    assert not same_device(torch.device("cpu"), torch.device("meta"))
    assert same_device(torch.device("cuda:1"), torch.device("cuda:1"))
    assert not same_device(torch.device("cuda:0"), torch.device("cuda:1"))
    assert not same_device(torch.device("cuda:0"), torch.device("cpu"))
    if torch.cuda.is_available():  # the trainer's torch.device("cuda") against its parameters' cuda:0
        here = torch.cuda.current_device()
        assert same_device(torch.device("cuda"), torch.device("cuda", here))


def test_on_device_leaves_a_model_that_is_there_untouched(monkeypatch):
    model = tiny_model(char_tokenizer())
    calls = []
    monkeypatch.setattr(type(model), "to", lambda self, *a, **k: calls.append(a) or self)
    with on_device(model, torch.device("cpu")) as inside:
        assert inside is model
    assert calls == []  # no walk over the modules for a move that moves nothing


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen flash attention needs CUDA")
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(14, 2, 64), (12, 2, 128), (8, 8, 64)])
def test_varlen_packed_attention_with_shared_kv_heads_matches_expanded(heads, kv_heads, head_dim):
    from atlas_fast.memory import packing

    if packing._varlen_attn() is None:
        pytest.skip("this torch has no varlen attention")
    config = type("Config", (), dict(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim))
    shape = packing._head_shape(config)
    packing._GQA_PROBE[shape] = packing._unflagged_gqa_works(*shape)
    g = torch.Generator(device="cuda").manual_seed(0)
    cu = torch.tensor([0, 37, 100, 161], device="cuda", dtype=torch.int32)
    q, k, v = (torch.randn(1, h, 161, head_dim, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    module = torch.nn.Module()

    def run(key, value):
        out, _ = packing.varlen_attention_forward(module, q, key, value, None, cu_seq_lens_q=cu, max_length_q=63)
        return out

    out = run(k, v)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    groups = heads // kv_heads
    expanded = run(k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1))
    reference = torch.autograd.grad(expanded.float().square().sum(), (q, k, v))
    for a, b in zip((out, *grads), (expanded, *reference)):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention needs CUDA")
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(14, 2, 64), (12, 2, 128), (8, 8, 64)])
def test_packed_attention_through_the_flash_op_matches_sdpa_per_sequence(monkeypatch, heads, kv_heads, head_dim):
    """Where the setup probe passes, packed rows call aten's flash op directly: outputs and
    gradients equal causal SDPA run on each sequence alone (float32 math)."""
    from atlas_fast.memory import packing

    if packing._varlen_attn() is None:
        pytest.skip("this torch has no varlen attention")
    shape = (heads, kv_heads, head_dim)
    packing._DIRECT_PROBE.pop(shape, None)
    assert packing._direct_flash_works(*shape)
    monkeypatch.setitem(packing._DIRECT_PROBE, shape, True)
    calls = []
    monkeypatch.setattr(packing, "_flash_direct", lambda *a, _real=packing._flash_direct: calls.append(1) or _real(*a))
    g = torch.Generator(device="cuda").manual_seed(0)
    bounds = [0, 37, 100, 161]
    cu = torch.tensor(bounds, device="cuda", dtype=torch.int32)
    q, k, v = (torch.randn(1, h, 161, head_dim, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    out, _ = packing.varlen_attention_forward(torch.nn.Module(), q, k, v, None, cu_seq_lens_q=cu, max_length_q=63)
    assert calls == [1]
    weights = torch.randn(out.shape, device="cuda", generator=g)
    grads = torch.autograd.grad((out.float() * weights).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().float().requires_grad_() for t in (q, k, v))
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        kk, vv = (t[:, :, a:b].repeat_interleave(heads // kv_heads, dim=1) for t in (k64, v64))
        parts.append(torch.nn.functional.scaled_dot_product_attention(q64[:, :, a:b], kk, vv, is_causal=True))
    expected = torch.cat(parts, dim=2).transpose(1, 2)
    reference = torch.autograd.grad((expected * weights).sum(), (q64, k64, v64))
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    for got, want in zip(grads, reference):
        torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)


def test_log_prob_pass_keeps_padded_forwards_within_max_forward_tokens(tmp_path, tok):
    trainer = _trainer(tmp_path, tok, "budget", padding_free=False, max_forward_tokens=24)
    # rows 0-3 short (1 + 1 tokens), rows 4-7 long (10 + 10): the first slice of 4 fits the budget at
    # its own width, not at the generation batch's
    batch = micro_batch(prompt_lengths=(1, 1, 1, 1, 10, 10, 10, 10), completion_lengths=(1, 1, 1, 1, 10, 10, 10, 10))
    parts = trainer._logp_forwards(batch, 4)
    assert [tuple(p.input_ids.shape) for p in parts] == [(4, 2), (1, 20), (1, 20), (1, 20), (1, 20)]
    width = batch.completion_ids.shape[1]
    with torch.no_grad():
        chunked = trainer._batched_logps(trainer.model, parts, width)
        whole = trainer._batched_logps(trainer.model, [batch], width)
    mask = batch.completion_mask
    torch.testing.assert_close(chunked[mask], whole[mask], atol=1e-5, rtol=1e-5)


def _mistral(window):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(
        vocab_size=53, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, sliding_window=window, attn_implementation="sdpa",
        pad_token_id=0, bos_token_id=None, eos_token_id=1))


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=53, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    ffn_dim=64, word_embed_proj_dim=32, pad_token_id=0, dropout=0.0,
                                    attn_implementation="sdpa"))


@pytest.mark.parametrize("build,impls", [(lambda: _mistral(4), ("sdpa", "sdpa")),
                                         (lambda: _mistral(None), ("sdpa", "atlas_packed")),
                                         (_opt, ("atlas_sequences", "atlas_packed"))],
                         ids=["mistral-window-4", "mistral-no-window", "opt"])
@pytest.mark.parametrize("varlen", [None, True])
def test_packing_matches_padding_for_windowed_and_position_blind_models(build, impls, varlen):
    # Mistral declares its window with `sliding_window` alone (no use_sliding_window switch): it keeps
    # transformers' windowed mask, which separates packed sequences, even when varlen is forced. OPT's
    # mask builder never sees the position ids, so transformers' mask would span the row: it gets
    # per-sequence attention instead (or, forced, varlen's, whose CPU path is a block mask).
    model = build()
    mb = micro_batch(prompt_lengths=(6, 3, 4, 1), completion_lengths=(7, 2, 0, 5), vocab=53)
    expected = loss_and_grads(model, mb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a forced varlen on a windowed model says it packs another way
        assert prepare_packing(model, varlen=varlen, attention="auto")
    assert model.config._attn_implementation == impls[varlen is True]
    assert_same(loss_and_grads(model, mb, packed_completion_logits), expected)


def test_packed_attention_refuses_a_window_it_would_not_apply():
    from atlas_fast.memory import packing

    q = torch.zeros(1, 2, 6, 8)
    cu = torch.tensor([0, 5, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="sliding window of 4 tokens"):
        packing.sequences_attention_forward(torch.nn.Module(), q, q, q, None, cu_seq_lens_q=cu, max_length_q=5,
                                            sliding_window=4)
    out, _ = packing.sequences_attention_forward(torch.nn.Module(), q, q, q, None, cu_seq_lens_q=cu, max_length_q=5,
                                                 sliding_window=5)  # a window no sequence outgrows changes nothing
    assert out.shape == (1, 6, 2, 8)


def test_log_prob_pass_groups_small_micro_batches_under_max_forward_tokens(tmp_path, tok):
    batch = micro_batch(prompt_lengths=(2, 3, 1, 4, 2, 2), completion_lengths=(3, 1, 2, 2, 4, 1))
    width = batch.completion_ids.shape[1]
    for padding_free in (False, True):
        plain = _trainer(tmp_path, tok, f"plain{padding_free}", padding_free=padding_free)
        budget = _trainer(tmp_path, tok, f"budget{padding_free}", padding_free=padding_free, max_forward_tokens=64)
        assert len(plain._logp_forwards(batch, 2)) == 3  # one forward per micro-batch of 2 rows
        parts = budget._logp_forwards(batch, 2)
        assert [len(p.advantages) for p in parts] == [6]  # all six rows fit one forward
        with torch.no_grad():
            grouped = budget._batched_logps(budget.model, parts, width)
            apart = plain._batched_logps(plain.model, plain._logp_forwards(batch, 2), width)
        mask = batch.completion_mask
        torch.testing.assert_close(grouped[mask], apart[mask], atol=1e-5, rtol=1e-5)
