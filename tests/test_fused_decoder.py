"""fused_decoder: a Llama/Qwen2/Qwen3 decoder layer as one autograd node with a hand-written backward gives
the stock layer's outputs and gradients (float32 and bf16, padded and packed rows, with and without
checkpointing and activation offload; kernels through the Triton interpreter on CPU), and hands
every call it cannot compute back to the stock forward."""
from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch

from atlas_fast.fused_decoder import decoder_problem, fuse_decoder_layers, unfuse_decoder_layers
from atlas_fast.fused_layers import fuse_layers
from atlas_fast.memory import decoder_layers, enable_activation_checkpointing, packed_completion_logits, prepare_packing
from test_memory import loss_and_grads, micro_batch
from tiny import char_tokenizer, tiny_model


# The CPU tests need the kernels on CPU tensors: the Triton interpreter (a GPU machine sets it
# explicitly to run them; the CUDA test at the end covers compiled kernels).
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU kernels need TRITON_INTERPRET=1")


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def llama(tok, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, mlp_bias=True,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).to(dtype)


def qwen3(tok, dtype=torch.float32):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(3)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
    return Qwen3ForCausalLM(cfg).to(dtype)


ARCHS = {"qwen2": lambda tok: tiny_model(tok, layers=2), "llama": llama, "qwen3": qwen3}


def fused_nodes(model) -> list[str]:
    """The autograd node that produced each decoder layer's output in the last forward."""
    names = []
    for layer in decoder_layers(model):
        layer.register_forward_hook(lambda m, a, out: names.append(type(out.grad_fn).__name__ if out.grad_fn else None))
    return names


def assert_close_grads(got, expected, rtol=1e-4, atol=1e-6):
    (lg, gg), (le, ge) = got, expected
    torch.testing.assert_close(lg, le, rtol=rtol, atol=atol)
    assert gg.keys() == ge.keys()
    for name, g in ge.items():
        torch.testing.assert_close(gg[name], g, rtol=rtol, atol=atol, msg=name)


@interpreted
def assert_close_to_bf16_rounding(got, expected):
    """Loss within 1%, each gradient within 3% of its norm: the two paths round bf16 GEMM outputs
    and sums in different places (the fused backward adds the q, k and v input gradients inside one
    accumulation)."""
    (lg, gg), (le, ge) = got, expected
    assert abs(lg.float() - le.float()) <= 1e-2 * abs(le.float())
    assert gg.keys() == ge.keys()
    for name, g in ge.items():
        err = (gg[name].float() - g.float()).norm() / g.float().norm().clamp_min(1e-12)
        assert err < 3e-2, (name, err)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("mode", ["plain", "checkpointing", "offload", "packed"])
def test_fused_layers_keep_loss_and_gradients(tok, arch, mode):
    model = ARCHS[arch](tok)
    mb = micro_batch(seed=4)
    logits_fn = None
    if mode == "packed":
        assert prepare_packing(model, varlen=True)
        logits_fn = packed_completion_logits
    run = (lambda m: loss_and_grads(m, mb, logits_fn)) if logits_fn else (lambda m: loss_and_grads(m, mb))
    expected = run(model)
    assert fuse_layers(model, decoder=True) > 0
    assert all(decoder_problem(layer) is None for layer in decoder_layers(model))
    if mode in ("checkpointing", "offload"):
        enable_activation_checkpointing(model, offload=mode == "offload")
    nodes = fused_nodes(model)
    assert_close_grads(run(model), expected)
    assert nodes == ["_DecoderLayerFnBackward"] * 2


@interpreted
def test_bf16_matches_the_stock_layers_to_rounding(tok):
    model = tiny_model(tok, layers=2, hidden=64).to(torch.bfloat16)
    mb = micro_batch(seed=6)
    expected = loss_and_grads(model, mb)
    fuse_decoder_layers(model)
    enable_activation_checkpointing(model)
    nodes = fused_nodes(model)
    got = loss_and_grads(model, mb)
    assert nodes == ["_DecoderLayerFnBackward"] * 2
    assert_close_to_bf16_rounding(got, expected)


@interpreted
@pytest.mark.parametrize("arch,checkpointing", [("llama", False), ("llama", True), ("qwen3", True)])
def test_float32_weights_under_autocast_compute_as_autocast_would(tok, arch, checkpointing):
    """The trainer's default: float32 weights, bf16 autocast. Projections in bf16, residual stream,
    norms and the weights' gradients in float32, as in the stock layer."""
    model = ARCHS[arch](tok)
    mb = micro_batch(seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = loss_and_grads(model, mb)
    fuse_decoder_layers(model)
    if checkpointing:
        enable_activation_checkpointing(model)
    nodes = fused_nodes(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_and_grads(model, mb)
    assert nodes == ["_DecoderLayerFnBackward"] * 2
    assert all(g.dtype == torch.float32 for g in got[1].values())
    assert_close_to_bf16_rounding(got, expected)


def fused_calls(monkeypatch) -> list:
    """One entry per layer call that the fused path computed (with or without autograd)."""
    from atlas_fast import fused_decoder

    calls = []
    monkeypatch.setattr(fused_decoder, "_forward", lambda *a, _real=fused_decoder._forward, **k: calls.append(1) or _real(*a, **k))
    return calls


@interpreted
def test_no_grad_forward_and_generation_match_the_stock_model(tok, monkeypatch):
    model = tiny_model(tok, layers=2).eval()
    ids = torch.randint(3, len(tok), (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    prompts = ids[:, :4]
    generated = model.generate(prompts, max_new_tokens=5, do_sample=False)
    assert fuse_decoder_layers(model) == 2
    calls = fused_calls(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, expected, rtol=1e-5, atol=1e-6)
    assert len(calls) == 2
    assert torch.equal(model.generate(prompts, max_new_tokens=5, do_sample=False), generated)
    assert len(calls) == 2  # a KV cache takes the stock path


@interpreted
def test_calls_it_cannot_compute_take_the_stock_forward(tok):
    model = tiny_model(tok, layers=1)
    mb = micro_batch(seed=2)
    expected = loss_and_grads(model, mb)
    fuse_decoder_layers(model)
    nodes = fused_nodes(model)
    # bf16 weights under fp16 autocast: not a pair this computes
    half = copy.deepcopy(model).to(torch.bfloat16)
    half_nodes = fused_nodes(half)
    with torch.autocast("cpu", dtype=torch.float16):
        loss_and_grads(half, mb)
    assert half_nodes and "_DecoderLayerFnBackward" not in half_nodes
    # a hook on a projection must see its call
    seen = []
    handle = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: seen.append(1))
    assert_close_grads(loss_and_grads(model, mb), expected)
    assert seen and nodes[-1] != "_DecoderLayerFnBackward"
    handle.remove()
    # attention dropout in training
    model.model.layers[0].self_attn.attention_dropout = 0.5
    model.train()
    loss_and_grads(model, mb)
    assert nodes[-1] != "_DecoderLayerFnBackward"
    model.model.layers[0].self_attn.attention_dropout = 0.0
    assert_close_grads(loss_and_grads(model, mb), expected)
    assert nodes[-1] == "_DecoderLayerFnBackward"
    unfuse_decoder_layers(model)
    assert "forward" not in model.model.layers[0].__dict__


@interpreted
@pytest.mark.parametrize("hook", ["backward-on-mlp", "on-the-activation", "global-forward"])
def test_any_hook_on_the_parts_takes_the_stock_path(tok, hook):
    model = tiny_model(tok, layers=1)
    mb = micro_batch(seed=9)
    expected = loss_and_grads(model, mb)
    fuse_decoder_layers(model)
    nodes, fired = fused_nodes(model), []
    mlp = model.model.layers[0].mlp
    if hook == "backward-on-mlp":
        handle = mlp.register_full_backward_hook(lambda *a: fired.append(1))
    elif hook == "on-the-activation":
        handle = mlp.act_fn.register_forward_hook(lambda *a: fired.append(1))
    else:
        handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: fired.append(1))
    try:
        got = loss_and_grads(model, mb)
    finally:
        handle.remove()
    assert fired and nodes == ["AddBackward0"]
    assert_close_grads(got, expected)


@interpreted
@pytest.mark.parametrize("when", ["before-fusing", "after-fusing"])
def test_a_forward_rebound_on_a_part_takes_the_stock_path(tok, when):
    """accelerate's hooks and users' patches bind a forward on the instance: the layer must run it."""
    import types

    def halve(model):
        mlp = model.model.layers[0].mlp
        mlp.forward = types.MethodType(lambda self, x: 0.5 * type(self).forward(self, x), mlp)

    model = tiny_model(tok, layers=1)
    mb = micro_batch(seed=5)
    halve(model)
    expected = loss_and_grads(model, mb)
    model = tiny_model(tok, layers=1)
    if when == "before-fusing":
        halve(model)
        assert "bound on the instance" in decoder_problem(model.model.layers[0])
        fuse_layers(model, decoder=True)
        layer = model.model.layers[0]
        assert "_atlas_fused_decoder" not in layer.__dict__ and "_atlas_fused" not in layer.mlp.__dict__
    else:
        assert fuse_decoder_layers(model) == 1
        halve(model)
    nodes = fused_nodes(model)
    assert_close_grads(loss_and_grads(model, mb), expected)
    assert nodes == ["AddBackward0"]


@interpreted
@pytest.mark.parametrize("order", ["patch-checkpoint-fuse", "fuse-patch-checkpoint", "fuse_layers-patch-part",
                                   "swap-patch-part-fuse", "fuse_layers-patch-part-unfuse"])
def test_a_patch_laid_over_our_forwards_is_run(tok, order):
    """Our markers stay on a module when someone binds a forward over ours: which forward is ours is
    told by its function, so a patch on the layer or on a part is run, and unfusing keeps it."""
    import types

    from atlas_fast.fused_layers import unfuse_layers

    def halve_layer(model):
        layer = model.model.layers[0]
        inner = layer.forward
        layer.forward = types.MethodType(lambda self, *a, **k: 0.5 * inner(*a, **k), layer)

    def halve_mlp(model):
        mlp = model.model.layers[0].mlp
        mlp.forward = types.MethodType(lambda self, x: 0.5 * _swiglu(self, x), mlp)

    def _swiglu(mlp, x):
        return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))

    mb = micro_batch(seed=8)
    expected_model = tiny_model(tok, layers=1)
    (halve_mlp if "part" in order else halve_layer)(expected_model)
    expected = loss_and_grads(expected_model, mb)
    model = tiny_model(tok, layers=1)
    if order == "patch-checkpoint-fuse":
        halve_layer(model)
        enable_activation_checkpointing(model)
        assert "bound on the instance" in decoder_problem(model.model.layers[0])
        fuse_layers(model, decoder=True)
    elif order == "fuse-patch-checkpoint":
        fuse_decoder_layers(model)
        halve_layer(model)
        enable_activation_checkpointing(model)
    elif order == "fuse_layers-patch-part":
        fuse_layers(model, decoder=True)
        halve_mlp(model)
    elif order == "swap-patch-part-fuse":
        fuse_layers(model, decoder=False)
        halve_mlp(model)
        assert "bound on the instance" in decoder_problem(model.model.layers[0])
        assert fuse_decoder_layers(model) == 0
    else:
        fuse_layers(model, decoder=True)
        halve_mlp(model)
        unfuse_layers(model)
        assert "forward" in model.model.layers[0].mlp.__dict__
    nodes = fused_nodes(model)
    assert_close_grads(loss_and_grads(model, mb), expected)
    assert "_DecoderLayerFnBackward" not in nodes


@interpreted
@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_hook_may_edit_the_layers_output_in_place(tok, checkpointing):
    """The node's output is a tensor of its own: a view made inside a custom Function refuses in-place edits."""
    def scale(model):
        model.model.layers[0].register_forward_hook(lambda m, args, out: out.mul_(0.5))

    model = tiny_model(tok, layers=2)
    mb = micro_batch(seed=6)
    fused = copy.deepcopy(model)
    scale(model)
    expected = loss_and_grads(model, mb)
    fuse_decoder_layers(fused)
    if checkpointing:
        enable_activation_checkpointing(fused)
    nodes = fused_nodes(fused)  # recorded before the edit
    scale(fused)
    assert_close_grads(loss_and_grads(fused, mb), expected)
    assert nodes == ["_DecoderLayerFnBackward"] * 2


@interpreted
def test_a_partial_rotary_width_is_left_to_the_stock_layer(tok):
    """Rotary tables narrower than the head (partial_rotary_factor) are not this node's to read: the
    stock layer's own error comes out, not a result computed from past the end of the table."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=80, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0,
                                                                      "partial_rotary_factor": 0.5})
    model = LlamaForCausalLM(cfg)
    mb = micro_batch(seed=1)
    with pytest.raises(RuntimeError) as stock:
        loss_and_grads(model, mb)
    fuse_decoder_layers(model)
    with pytest.raises(RuntimeError) as fused:
        loss_and_grads(model, mb)
    assert str(fused.value) == str(stock.value)


def test_without_the_fused_rotary_no_layer_is_fused(tok):
    """The node rotates q and k with atlas_kernels.rope: fused_rotary=False keeps the layers stock."""
    model = tiny_model(tok, layers=2)
    assert fuse_layers(model, rotary=False, decoder=True) > 0  # norms and MLPs
    assert not any("_atlas_fused_decoder" in layer.__dict__ for layer in decoder_layers(model))
    assert not any("_atlas_fused" in layer.self_attn.__dict__ for layer in decoder_layers(model))


@interpreted
def test_checkpointing_in_either_order_and_its_other_modes(tok):
    """Fused after our checkpointing, the wrapper stays and recomputes the node; unfused, it wraps the
    stock forward again; keep_attention and transformers' own checkpointing checkpoint the stock layer."""
    from atlas_fast.memory.checkpointing import _checkpointed_call

    model = tiny_model(tok, layers=2)
    mb = micro_batch(seed=10)
    expected = loss_and_grads(model, mb)
    layer = model.model.layers[0]
    enable_activation_checkpointing(model)
    fuse_decoder_layers(model)
    assert layer.forward.__func__ is _checkpointed_call
    nodes = fused_nodes(model)
    assert_close_grads(loss_and_grads(model, mb), expected)
    assert nodes == ["_DecoderLayerFnBackward"] * 2
    unfuse_decoder_layers(model)
    assert layer.forward.__func__ is _checkpointed_call
    assert_close_grads(loss_and_grads(model, mb), expected)
    assert nodes[-1] != "_DecoderLayerFnBackward"

    kept = tiny_model(tok, layers=2)
    fuse_decoder_layers(kept)
    enable_activation_checkpointing(kept, keep_attention=True)
    kept_nodes = fused_nodes(kept)
    assert_close_grads(loss_and_grads(kept, mb), expected)
    assert kept_nodes and "_DecoderLayerFnBackward" not in kept_nodes

    theirs = tiny_model(tok, layers=2)
    fuse_decoder_layers(theirs)
    theirs.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    theirs.train()
    theirs_nodes = fused_nodes(theirs)
    assert_close_grads(loss_and_grads(theirs, mb), expected)
    assert theirs_nodes and "_DecoderLayerFnBackward" not in theirs_nodes


@interpreted
def test_a_second_backward_through_one_graph_is_refused_by_name(tok):
    model = tiny_model(tok, layers=1)
    fuse_decoder_layers(model)
    ids = torch.randint(3, len(tok), (1, 6), generator=torch.Generator().manual_seed(4))
    loss = model(input_ids=ids, use_cache=False).logits.sum()  # a KV cache would take the stock path
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        loss.backward()


@interpreted
def test_deepcopy_computes_with_the_copy(tok, monkeypatch):
    model = tiny_model(tok, layers=1)
    fuse_decoder_layers(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    ids = torch.randint(3, len(tok), (1, 7), generator=torch.Generator().manual_seed(3))
    calls = fused_calls(monkeypatch)
    with torch.no_grad():
        fused_twin = twin(input_ids=ids, use_cache=False).logits
        assert calls == [1]
        unfuse_decoder_layers(twin)
        torch.testing.assert_close(fused_twin, twin(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(fused_twin, model(input_ids=ids, use_cache=False).logits)


def test_layers_it_does_not_know_are_named(tok):
    import peft
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    lora = peft.get_peft_model(tiny_model(tok, layers=1), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert "nn.Linear" in decoder_problem(decoder_layers(lora)[0])
    assert fuse_decoder_layers(lora) == 0

    class ScaledAttention(Qwen2Attention):  # computes something else: not ours to fuse
        def forward(self, hidden_states, *args, **kwargs):
            out, weights = super().forward(hidden_states, *args, **kwargs)
            return 2 * out, weights

    other = tiny_model(tok, layers=1)
    other.model.layers[0].self_attn.__class__ = ScaledAttention
    assert "attention" in decoder_problem(other.model.layers[0])
    assert decoder_problem(qwen3(tok).model.layers[0]) is None
    model = tiny_model(tok, layers=1)
    model.model.layers[0].self_attn.sliding_window = 8
    assert decoder_problem(model.model.layers[0]) == "sliding-window attention"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels and varlen attention need CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float32-autocast"])
@pytest.mark.parametrize("mode", ["plain", "checkpointing", "offload", "qwen3"])
def test_fused_layers_keep_loss_and_gradients_cuda(tok, monkeypatch, dtype, mode):
    """Packed rows on the GPU (Qwen2, and Qwen3 checkpointed): flash attention in bf16 and under autocast (float32 weights, q and k
    promoted to float32 by the rotary embedding, cast back for the kernel), the block-mask path in
    float32."""
    import contextlib

    from atlas_fast.memory import packing

    autocast = dtype == "float32-autocast"
    model = qwen3(tok) if mode == "qwen3" else tiny_model(tok, layers=2, hidden=128)
    model = model.to("cuda", torch.float32 if autocast else getattr(torch, dtype))
    mb = micro_batch(seed=7)
    mb = dataclasses.replace(mb, **{f.name: getattr(mb, f.name).cuda() for f in dataclasses.fields(mb)
                                    if isinstance(getattr(mb, f.name), torch.Tensor)})
    assert prepare_packing(model)
    context = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    with context():
        expected = loss_and_grads(model, mb, packed_completion_logits)
    assert fuse_decoder_layers(model) == 2
    if mode != "plain":
        enable_activation_checkpointing(model, offload=mode == "offload")
    nodes = fused_nodes(model)
    masks = []
    monkeypatch.setattr(packing, "_block_causal_mask", lambda *a, _real=packing._block_causal_mask: masks.append(1) or _real(*a))
    with context():
        got = loss_and_grads(model, mb, packed_completion_logits)
    assert nodes == ["_DecoderLayerFnBackward"] * 2
    assert bool(masks) == (dtype == "float32")  # flash kernels for bf16, under autocast too
    if dtype == "float32":
        assert_close_grads(got, expected, rtol=1e-4, atol=1e-5)
    else:
        assert_close_to_bf16_rounding(got, expected)
