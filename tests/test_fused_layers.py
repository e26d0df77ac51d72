"""fused_layers: the stock RMSNorms, SwiGLU MLPs and attention rotary embeddings swapped for
atlas_kernels' fused kernels give the model's outputs and gradients (float32, kernels through the
Triton interpreter on CPU), survive a deepcopy bound to the copy, and leave modules they do not
know alone."""
from __future__ import annotations

import copy
import inspect
import types

import pytest
import torch

from atlas_fast import fused_layers
from atlas_fast.fused_layers import plain_rms_norm, rope_attention, swiglu_mlp, unfuse_layers
from tiny import char_tokenizer, tiny_model


fuse_layers = fused_layers.fuse_layers


def test_rotary_swap_has_its_own_switch(tok):
    model = tiny_model(tok, layers=1)
    assert fused_layers.fuse_layers(model, rotary=False) > 0
    assert not any("forward" in m.__dict__ for m in model.modules() if type(m).__name__.endswith("Attention"))
    assert fused_layers.fuse_layers(model) == 1  # the attention, swapped by default


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def qwen3(tok):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(1)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
    return Qwen3ForCausalLM(cfg)


def loss_and_grads(model, ids, position_ids=None):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, position_ids=position_ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "qwen2-packed"])
def test_fused_model_keeps_outputs_and_gradients(tok, arch):
    """qwen2-packed: one row of three sequences whose positions restart, as the padding-free batch
    gives them (only cos and sin change)."""
    model = qwen3(tok) if arch == "qwen3" else tiny_model(tok, layers=2)
    rows = 1 if arch == "qwen2-packed" else 3
    ids = torch.randint(0, len(tok), (rows, 11), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(n) for n in (4, 5, 2)])[None] if arch == "qwen2-packed" else None
    loss, grads = loss_and_grads(model, ids, positions)
    norms = sum(plain_rms_norm(m) for m in model.modules())
    mlps = sum(swiglu_mlp(m) for m in model.modules())
    attns = sum(rope_attention(m) for m in model.modules())
    assert norms == (2 * 2 + 1 + (2 * 2 if arch == "qwen3" else 0)) and mlps == 2  # q/k norms in Qwen3
    assert attns == 2
    assert fuse_layers(model) == norms + mlps + attns
    assert fuse_layers(model) == 0  # already swapped
    fused_loss, fused_grads = loss_and_grads(model, ids, positions)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=1e-6)
    assert fused_grads.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_forward_runs_the_kernels_and_survives_deepcopy(tok, monkeypatch):
    import atlas_kernels

    model = tiny_model(tok, layers=1)
    fuse_layers(model)
    calls = []
    real_norm, real_silu, real_rope = atlas_kernels.rms_norm, atlas_kernels.silu_mul, atlas_kernels.rope
    monkeypatch.setattr(atlas_kernels, "rms_norm", lambda *a: calls.append("norm") or real_norm(*a))
    monkeypatch.setattr(atlas_kernels, "silu_mul", lambda *a: calls.append("silu") or real_silu(*a))
    monkeypatch.setattr(atlas_kernels, "rope", lambda *a: calls.append("rope") or real_rope(*a))
    copied = copy.deepcopy(model)
    with torch.no_grad():
        copied.model.norm.weight.mul_(2.0)  # the copy's forward must read the copy's weight
        ids = torch.tensor([[1, 2, 3, 4]])
        hidden = copied.model(input_ids=ids).last_hidden_state
        original = model.model(input_ids=ids).last_hidden_state
    assert calls.count("norm") == 2 * 3 and calls.count("silu") == 2  # two norms per layer + final, both models
    assert calls.count("rope") == 2
    torch.testing.assert_close(hidden, 2.0 * original, rtol=1e-5, atol=1e-6)
    unfuse_layers(model)
    calls.clear()
    with torch.no_grad():
        model(input_ids=ids)
        tiny_model(tok, layers=1)(input_ids=ids)  # another model in the process: transformers untouched
    assert calls == []
    copied(input_ids=ids)
    assert calls.count("rope") == 1  # the copy keeps its own swap


def test_modules_it_does_not_know_are_left_alone(tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, hidden_act="gelu")
    model = Qwen2ForCausalLM(cfg)
    model.model.norm.register_forward_hook(lambda *a: None)  # a hooked norm is called as a module
    assert fuse_layers(model) == 3  # the layer's two norms and its attention; not the GELU MLP, not the hooked final norm
    assert "forward" not in model.model.layers[0].mlp.__dict__
    assert "forward" not in model.model.norm.__dict__


def test_look_alikes_that_compute_something_else_are_left_alone():
    """Same names and attributes, another computation: a norm that rounds after the weight (as
    OLMo2's does) and an MLP that scales its activation (as Falcon-H1's does) keep their forward."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Config, Qwen2MLP, Qwen2RMSNorm

    class RoundAfterRMSNorm(Qwen2RMSNorm):
        def forward(self, hidden_states):
            h = hidden_states.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (self.weight * h).to(hidden_states.dtype)

    class ScaledMLP(Qwen2MLP):
        def forward(self, x):
            return self.down_proj(self.act_fn(0.5 * self.gate_proj(x)) * self.up_proj(x))

    cfg = Qwen2Config(hidden_size=16, intermediate_size=32)
    model = torch.nn.ModuleList([RoundAfterRMSNorm(16), ScaledMLP(cfg), Qwen2RMSNorm(16), Qwen2MLP(cfg)])
    assert [plain_rms_norm(m) for m in model] == [False, False, True, False]
    assert [swiglu_mlp(m) for m in model] == [False, False, False, True]
    assert fuse_layers(model) == 2
    assert [("forward" in m.__dict__) for m in model] == [False, False, True, True]


def test_lora_adapters_on_the_mlp_still_apply(tok):
    """Under PEFT the fused MLP calls the wrapped projections, so the adapters' updates count:
    outputs and the adapters' gradients equal the unfused model's."""
    import peft

    torch.manual_seed(3)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"],
                           init_lora_weights=False)  # non-zero B: the adapters change the output
    model = peft.get_peft_model(tiny_model(tok, layers=1), lora)
    ids = torch.randint(0, len(tok), (2, 9), generator=torch.Generator().manual_seed(1))
    loss, grads = loss_and_grads(model, ids)
    assert fuse_layers(model) == 5  # two layer norms, the final norm, the MLP, the attention's rotary embedding
    fused_loss, fused_grads = loss_and_grads(model, ids)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=1e-6)
    assert any("lora" in name for name in grads) and fused_grads.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def _attention_class(name, **globals_):
    """A Qwen2Attention whose forward is the stock code, reading its modeling file's globals with
    `globals_` in place: what another model family's copy of the attention would look like."""
    from transformers.models.qwen2 import modeling_qwen2

    stock = inspect.unwrap(modeling_qwen2.Qwen2Attention.forward)
    g = {**stock.__globals__, **globals_}
    if "rotate_half" in globals_:  # Llama's apply_rotary_pos_emb code, calling this rotate_half
        g["apply_rotary_pos_emb"] = types.FunctionType(modeling_qwen2.apply_rotary_pos_emb.__code__, g)
    forward = types.FunctionType(stock.__code__, g, "forward", stock.__defaults__, stock.__closure__)
    return type(name, (modeling_qwen2.Qwen2Attention,), {"forward": forward})


def test_attention_that_rotates_otherwise_keeps_its_rotary_embedding():
    """The rotary embedding is swapped only where the attention's file computes it as Llama's does:
    an apply_rotary_pos_emb of the same code calling a rotate_half over interleaved pairs (as
    GPT-J-style models rotate), or an apply_rotary_pos_emb of its own, keep their forward."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2Config

    def interleaved(x):
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

    def own(q, k, cos, sin, unsqueeze_dim=1):
        return q, k

    cfg = Qwen2Config(hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    model = torch.nn.ModuleList([_attention_class("InterleavedAttention", rotate_half=interleaved)(cfg, 0),
                                 _attention_class("OwnRopeAttention", apply_rotary_pos_emb=own)(cfg, 0),
                                 _attention_class("CopiedAttention")(cfg, 0), Qwen2Attention(cfg, 0)])
    assert [rope_attention(m) for m in model] == [False, False, True, True]
    assert fuse_layers(model) == 2
    assert [("forward" in m.__dict__) for m in model] == [False, False, True, True]


def test_calls_the_kernel_does_not_compute_run_the_stock_function(tok, monkeypatch):
    """The fused apply_rotary_pos_emb takes only the attention's own call; another layout
    (unsqueeze_dim=2 on [batch, tokens, heads, head_dim]) or cos/sin that require grad go to
    transformers' function, with its result and its gradient to cos/sin."""
    import atlas_kernels
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    model = tiny_model(tok, layers=1)
    fuse_layers(model)
    fused = model.model.layers[0].self_attn.forward.__func__.__wrapped__.__globals__["apply_rotary_pos_emb"]
    assert fused is not apply_rotary_pos_emb
    calls = []
    real_rope = atlas_kernels.rope
    monkeypatch.setattr(atlas_kernels, "rope", lambda *a: calls.append(1) or real_rope(*a))
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 5, 4, 16, generator=g), torch.randn(2, 5, 2, 16, generator=g)
    cos, sin = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    for a, b in zip(fused(q, k, cos, sin, unsqueeze_dim=2), apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    cos_grad = cos.clone().requires_grad_()
    fused(q.transpose(1, 2), k.transpose(1, 2), cos_grad, sin)[0].sum().backward()
    assert calls == [] and cos_grad.grad is not None
    out = fused(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert calls == [1]
    for a, b in zip(out, apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_generation_with_a_kv_cache_is_unchanged(tok):
    """Decoding feeds one token at a time against the cache: the fused rotary embedding gives the
    same greedy tokens and scores."""
    model = tiny_model(tok, layers=2).eval()
    ids = torch.randint(1, len(tok), (2, 6), generator=torch.Generator().manual_seed(4))
    opts = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        stock = model.generate(ids, **opts)
        fuse_layers(model)
        fused = model.generate(ids, **opts)
    assert torch.equal(fused.sequences, stock.sequences)
    for a, b in zip(fused.scores, stock.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
