"""The `hf` backend: transformers `generate` with a dynamic KV cache, over the live policy.

The reference every other backend is checked against, and the fallback for models our engine
does not know. It reads the model in place, so a weight update costs nothing.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from transformers import LogitsProcessor, LogitsProcessorList

from . import RolloutOutput, SamplingParams, check_stop_ids, cut_at_stop, left_pad, stop_ids
from .engine.sampling import apply_filters


class _Filters(LogitsProcessor):
    """Temperature, min_p, top-k and top-p, in vLLM's order (the engine's `apply_filters`)."""

    def __init__(self, sampling: SamplingParams):
        self.sampling = sampling

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return apply_filters(scores.float(), self.sampling)


class HFBackend:
    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, batch_size: int | None = None,
                 generation_kwargs: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size  # prompts per `generate` call; None: all at once
        self.generation_kwargs = dict(generation_kwargs or {})  # TRL's `generation_kwargs`, passed through
        self.eos_ids = stop_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)

    def update_weights(self, model: torch.nn.Module) -> None:
        self.model = model  # generates with the live policy: nothing to copy

    def close(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> RolloutOutput:
        model = self.model
        was_training = model.training
        model.eval()  # no dropout while sampling
        try:
            ids: list[list[int]] = []
            reasons: list[str] = []
            logps: list[list[float]] | None = [] if sampling.logprobs else None
            step = self.batch_size or len(prompt_ids) or 1
            if sampling.seed is not None:  # once per call: reseeding each chunk would repeat its draws
                torch.manual_seed(sampling.seed)
            for start in range(0, len(prompt_ids), step):
                chunk_ids, chunk_reasons, chunk_logps = self._generate_chunk(prompt_ids[start : start + step], sampling)
                ids += chunk_ids
                reasons += chunk_reasons
                if logps is not None:
                    logps += chunk_logps
            return RolloutOutput(ids, reasons, logps)
        finally:
            model.train(was_training)

    def _generate_chunk(self, prompt_ids, sampling: SamplingParams):
        device = next(self.model.parameters()).device
        n = sampling.n
        if sampling.greedy and n > 1:
            # transformers refuses num_return_sequences > 1 without sampling: repeat the prompts.
            prompt_ids = [p for p in prompt_ids for _ in range(n)]
            n = 1
        ids, mask = left_pad(prompt_ids, self.pad_id, device)
        # vLLM's meaning: ignore_eos drops the model's EOS ids, explicit stop ids still stop.
        stops = (set() if sampling.ignore_eos else self.eos_ids) | set(sampling.stop_token_ids)
        head = self.model.get_output_embeddings()
        if head is not None:
            check_stop_ids(sampling, head.weight.shape[0])
        kwargs: dict[str, Any] = dict(
            max_new_tokens=sampling.max_tokens,
            min_new_tokens=sampling.min_tokens or None,
            num_return_sequences=n,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(stops) or None,
            use_cache=True,  # gradient checkpointing switches it off for training; decoding needs it
            repetition_penalty=sampling.repetition_penalty,
            return_dict_in_generate=True,
            output_scores=sampling.logprobs,
        )
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            # transformers' own warpers apply min_p after top-k/top-p; vLLM (and the engine) before.
            # They are switched off (over the model's generation_config) and one processor applies
            # the engine's filters instead, after transformers' repetition penalty and min_new_tokens.
            kwargs.update(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, min_p=None,
                          logits_processor=LogitsProcessorList([_Filters(sampling)]))
        extra = dict(self.generation_kwargs)
        if "logits_processor" in extra and "logits_processor" in kwargs:  # a user's run after the filters
            kwargs["logits_processor"] = LogitsProcessorList([*kwargs["logits_processor"], *extra.pop("logits_processor")])
        kwargs.update(extra)
        out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        new = out.sequences[:, ids.shape[1] :]
        rows = new.tolist()  # host sync: the ids are needed as text next
        cut = [cut_at_stop(r, stops) for r in rows]
        logps = None
        if sampling.logprobs:
            # `scores` are the processed logits (temperature, top-k/p applied): the sampler's own
            # distribution, as vLLM's processed_logprobs mode reports it.
            scores = torch.stack(out.scores, 1).float().log_softmax(-1)  # [B, T, V]
            chosen = scores.gather(-1, new[:, : scores.shape[1], None]).squeeze(-1).tolist()
            logps = [lp[: len(c)] for lp, (c, _) in zip(chosen, cut)]
        return [c for c, _ in cut], [r for _, r in cut], logps
