"""The fused LM head in the training forward: body up to the final norm, then the fused kernels.

The hidden-state path must give the logits path's loss and parameter gradients (tied embeddings,
left-padded prompts, a LoRA policy with its adapter on and off), and models whose head is more
than a linear map must be refused with the reason, so the trainer can keep their logits.
"""
from __future__ import annotations

import pytest
import torch

import atlas_kernels
from atlas_fast.batch import LMHead, MicroBatch, completion_hidden, completion_logits, split_lm_head
from atlas_kernels import reference
from tiny import char_tokenizer, tiny_model

LOSS = dict(temperature=0.7, beta=0.04, loss_type="dapo", validate=False)


def micro_batch(tok, gen, B=4, P=5, C=6) -> MicroBatch:
    V = len(tok)
    input_ids = torch.randint(3, V, (B, P + C), generator=gen)
    attention_mask = torch.ones(B, P + C, dtype=torch.long)
    attention_mask[0, :2] = 0  # a left-padded prompt
    completion_mask = torch.arange(C)[None, :] < torch.tensor([C, 3, 1, 5])[:, None]
    attention_mask[:, P:] = completion_mask.long()
    return MicroBatch(
        input_ids=input_ids, attention_mask=attention_mask, completion_ids=input_ids[:, P:],
        completion_mask=completion_mask, advantages=torch.randn(B, generator=gen),
        old_logps=-torch.rand(B, C, generator=gen) * 3, ref_logps=-torch.rand(B, C, generator=gen) * 3,
        num_items=float(completion_mask.sum()),
    )


def loss_and_grads(model, mb, fused: bool):
    model.zero_grad(set_to_none=True)
    if fused:
        head = split_lm_head(model)
        assert isinstance(head, LMHead), head
        hidden = completion_hidden(head, mb)  # [B, C + 1, H]
        loss, _ = atlas_kernels.fused_linear_grpo_loss(
            hidden, head.weight, mb.completion_ids, mb.old_logps, mb.ref_logps, mb.advantages, mb.completion_mask,
            bias=head.bias, **LOSS)
    else:
        logits = completion_logits(model, mb)  # [B, C + 1, V]
        loss, _ = reference.grpo_loss_from_logits(logits, mb.completion_ids, mb.old_logps, mb.ref_logps,
                                                  mb.advantages, mb.completion_mask, **LOSS)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        err = ((grads_a[name] - grads_b[name]).norm() / grads_b[name].norm().clamp(min=1e-30)).item()
        assert err < 1e-5, f"{name}: relative error {err:.1e}"


def test_hidden_path_equals_logits_path_with_tied_embeddings():
    tok = char_tokenizer()
    model = tiny_model(tok, hidden=32, layers=2)
    head = split_lm_head(model)
    assert head.weight is model.get_input_embeddings().weight  # tied: one parameter, two uses
    mb = micro_batch(tok, torch.Generator().manual_seed(0))
    assert_same(loss_and_grads(model, mb, fused=True), loss_and_grads(model, mb, fused=False))


def test_hidden_path_equals_logits_path_for_lora():
    peft = pytest.importorskip("peft")
    tok = char_tokenizer()
    model = peft.get_peft_model(tiny_model(tok), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False))
    mb = micro_batch(tok, torch.Generator().manual_seed(1))
    assert_same(loss_and_grads(model, mb, fused=True), loss_and_grads(model, mb, fused=False))
    with torch.no_grad(), model.disable_adapter():  # the reference of a LoRA run
        head = split_lm_head(model)
        fused = atlas_kernels.fused_linear_logprobs(completion_hidden(head, mb), head.weight, mb.completion_ids)
        plain = reference.selective_logprobs(completion_logits(model, mb), mb.completion_ids)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


def test_heads_that_are_not_linear_maps_are_refused_with_the_reason():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                           final_logit_softcapping=30.0))
    reason = split_lm_head(gemma)
    assert isinstance(reason, str) and "final_logit_softcapping" in reason

    peft = pytest.importorskip("peft")
    tok = char_tokenizer()
    lora_head = peft.get_peft_model(tiny_model(tok, seed=1), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    reason = split_lm_head(lora_head)
    assert isinstance(reason, str) and "not a plain torch.nn.Linear" in reason
