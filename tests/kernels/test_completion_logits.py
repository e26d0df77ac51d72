"""The trainer's path into the fused loss: a real model's head output, passed unsliced."""
import torch

from atlas_fast.batch import MicroBatch, completion_logits
from atlas_kernels import grpo_loss_from_logits, reference, selective_logprobs
from tiny import char_tokenizer, tiny_model


def micro_batch(gen, vocab, prompt_lengths=(5, 2, 4), completion_lengths=(6, 3, 1)) -> MicroBatch:
    B, P, C = len(prompt_lengths), max(prompt_lengths), max(completion_lengths)
    ids = torch.zeros(B, P + C, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (p, c) in enumerate(zip(prompt_lengths, completion_lengths)):
        ids[b, P - p : P + c] = torch.randint(3, vocab, (p + c,), generator=gen)
        mask[b, P - p : P + c] = 1
    old = -torch.rand(B, C, generator=gen) * 3
    return MicroBatch(input_ids=ids, attention_mask=mask, completion_ids=ids[:, P:], completion_mask=mask[:, P:].bool(),
                      advantages=torch.randn(B, generator=gen), old_logps=old, ref_logps=old - 0.1,
                      num_items=float(mask[:, P:].sum()))


def loss_and_grads(model, mb, logits, **opts):
    loss, _ = grpo_loss_from_logits(logits, mb.completion_ids, mb.old_logps, mb.ref_logps, mb.advantages,
                                    mb.completion_mask, beta=0.04, loss_type="dapo", **opts)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_unsliced_head_output_feeds_the_kernels(gen):
    tok = char_tokenizer()
    model = tiny_model(tok, hidden=32, layers=1)
    mb = micro_batch(gen, len(tok))
    B, C = mb.completion_ids.shape

    logits = completion_logits(model, mb)
    assert logits.shape == (B, C + 1, len(tok))
    assert logits._base is None and logits.grad_fn is not None  # the head's own output, not a slice of it
    with torch.no_grad():
        expected = reference.selective_logprobs(logits[:, :-1].double(), mb.completion_ids)
        torch.testing.assert_close(selective_logprobs(logits, mb.completion_ids).double(), expected,
                                   atol=1e-5, rtol=1e-5)

    # In place (the default for a head output): the head's backward receives the logits buffer itself.
    ptr, seen = logits.data_ptr(), []
    logits.register_hook(seen.append)
    loss, grads = loss_and_grads(model, mb, logits)
    assert seen[0].data_ptr() == ptr and (seen[0][:, -1] == 0).all()

    # The same loss and parameter gradients as the sliced layout, and as the float64 reference.
    sliced_loss, sliced_grads = loss_and_grads(model, mb, completion_logits(model, mb)[:, :-1])
    ref_loss, _ = reference.grpo_loss_from_logits(
        completion_logits(model, mb).double(), mb.completion_ids, mb.old_logps.double(), mb.ref_logps.double(),
        mb.advantages.double(), mb.completion_mask, beta=0.04, loss_type="dapo")
    torch.testing.assert_close(loss, sliced_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss.double(), ref_loss.detach(), atol=1e-5, rtol=1e-5)
    assert grads.keys() == sliced_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], sliced_grads[name], atol=1e-6, rtol=1e-5, msg=name)
