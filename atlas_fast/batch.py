"""The unit of work of the update: one micro-batch of scored completions, and its forward.

Kept apart from the trainer (and free of datasets/tokenizers) so anything that trains on
rollouts, a benchmark or another loop, can build and run micro-batches with torch alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class MicroBatch:
    """Scored completions for one forward/backward. Shapes: B completions, P prompt, C completion."""

    input_ids: torch.Tensor  # [B, P + C] prompt left-padded, completion right-padded
    attention_mask: torch.Tensor  # [B, P + C]
    completion_ids: torch.Tensor  # [B, C]
    completion_mask: torch.Tensor  # [B, C] 1 up to and including the first EOS
    advantages: torch.Tensor  # [B]
    old_logps: torch.Tensor | None  # [B, C] sampling policy, when the batch is reused
    ref_logps: torch.Tensor | None  # [B, C] reference policy, when beta > 0
    num_items: float  # active completion tokens of the whole generation batch (dapo/cispo)

    def slice(self, rows: slice) -> "MicroBatch":
        parts = {}
        for f in fields(self):
            v = getattr(self, f.name)
            parts[f.name] = v[rows] if isinstance(v, torch.Tensor) else v
        return MicroBatch(**parts)

    def to_state(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def completion_logits(model: torch.nn.Module, mb: MicroBatch) -> torch.Tensor:
    """The head's output over the completion, unshifted: [B, C + 1, V], position t scoring
    completion token t and the last position scoring nothing.

    The atlas_kernels functions (and their references) take this layout as it is and skip the
    last position themselves. Slicing it off here would make autograd zero-fill a copy of the
    whole [B, C + 1, V] tensor in backward; unsliced, the fused loss writes d(logits) into this
    very tensor, which the head's backward then consumes.
    """
    C = mb.completion_ids.shape[1]
    # Left padding shifts where each prompt starts; positions follow the mask, as in generate().
    position_ids = (mb.attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=position_ids,
                logits_to_keep=C + 1, use_cache=False)
    return out.logits


# Config fields of models whose head does more than `hidden @ weight.T + bias`: the fused head
# cannot apply these, so such models keep the logits path (Gemma 2/3 soft-capping, Cohere's
# logit_scale, Granite's logits_scaling).
_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class LMHead:
    """A causal LM split where the fused head takes over: the body up to its final norm, and the
    output projection's parameters (weight [V, H], shared with the input embedding when tied)."""

    body: torch.nn.Module = field(repr=False)
    weight: torch.Tensor = field(repr=False)  # [V, H]
    bias: torch.Tensor | None = field(repr=False)  # [V]


def split_lm_head(model: torch.nn.Module) -> LMHead | str:
    """The model's body and plain linear head, or the reason the head cannot be fused (a string)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the wrapped model
    config = getattr(lm, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _HEAD_TRANSFORMS:
        value = getattr(text_config, name, None)
        if value not in (None, 1, 1.0):
            return f"{type(lm).__name__} transforms its logits ({name}={value})"
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:  # an adapter-wrapped or custom head computes more than x @ W.T + b
        kind = f"{type(head).__module__}.{type(head).__qualname__}"
        return f"{type(lm).__name__}'s output layer is {kind}, not a plain torch.nn.Linear"
    body = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    if body is None or body is lm:
        return f"{type(lm).__name__} exposes no decoder body (get_decoder())"
    return LMHead(body, head.weight, head.bias)


def completion_hidden(head: LMHead, mb: MicroBatch) -> torch.Tensor:
    """Final-norm hidden states at the C+1 last positions, [B, C+1, H]: position t predicts
    completion token t, the last one predicts past the completion (the fused kernels skip it)."""
    C = mb.completion_ids.shape[1]
    position_ids = (mb.attention_mask.cumsum(-1) - 1).clamp(min=0)  # as in completion_logits
    out = head.body(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=position_ids,
                    use_cache=False)
    return out.last_hidden_state[:, -(C + 1) :]


def concat_micro_batches(mbs: list[MicroBatch]) -> MicroBatch:
    """One micro-batch holding the rows of `mbs`, prompts left-padded and completions right-padded
    to the widest of them (padded positions are masked out; their ids are 0, any valid id would do)."""
    if len(mbs) == 1:
        return mbs[0]
    C = max(mb.completion_ids.shape[1] for mb in mbs)
    P = max(mb.input_ids.shape[1] - mb.completion_ids.shape[1] for mb in mbs)

    def widen(t: torch.Tensor, left: int, right: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (left, right))  # zeros before and after the last dim

    parts: dict[str, list] = {f.name: [] for f in fields(MicroBatch)}
    for mb in mbs:
        c = mb.completion_ids.shape[1]
        p = mb.input_ids.shape[1] - c
        parts["input_ids"].append(widen(mb.input_ids, P - p, C - c))
        parts["attention_mask"].append(widen(mb.attention_mask, P - p, C - c))
        for name in ("completion_ids", "completion_mask", "old_logps", "ref_logps"):
            value = getattr(mb, name)
            parts[name].append(None if value is None else widen(value, 0, C - c))
        parts["advantages"].append(mb.advantages)
    out = {}
    for name, values in parts.items():
        if name == "num_items":
            out[name] = mbs[0].num_items
        elif any(v is None for v in values):
            if not all(v is None for v in values):
                raise ValueError(f"concat_micro_batches: {name} is missing from some micro-batches")
            out[name] = None
        else:
            out[name] = torch.cat(values)
    return MicroBatch(**out)


def trim(mb: MicroBatch) -> MicroBatch:
    """Drop columns that are padding for every row of this micro-batch (left of prompts, right of completions)."""
    keep_c = max(int(mb.completion_mask.sum(1).max()), 1)
    C = mb.completion_ids.shape[1]
    P = mb.input_ids.shape[1] - C
    prompt_mask = mb.attention_mask[:, :P]
    first = int((prompt_mask.sum(0) > 0).float().argmax()) if bool(prompt_mask.any()) else P - 1
    cols = slice(first, P + keep_c)
    return MicroBatch(
        input_ids=mb.input_ids[:, cols], attention_mask=mb.attention_mask[:, cols],
        completion_ids=mb.completion_ids[:, :keep_c], completion_mask=mb.completion_mask[:, :keep_c],
        advantages=mb.advantages,
        old_logps=None if mb.old_logps is None else mb.old_logps[:, :keep_c],
        ref_logps=None if mb.ref_logps is None else mb.ref_logps[:, :keep_c],
        num_items=mb.num_items,
    )
