"""`RewardModel`: a 1-label sequence-classification model used as a reward function."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from atlas_fast.data import is_conversational

__all__ = ["RewardModel"]


class RewardModel:
    """A 1-label sequence-classification model used as a reward function.

    The score of a sample is `logits[:, 0]` on the prompt + completion text. Conversations are
    rendered with the reward tokenizer's chat template (prompt messages + completion messages).
    Text is passed with `add_special_tokens=False`, as TRL does, since chat templates already add
    their own BOS. `batch_size` bounds memory (None: the whole batch at once); `max_length`
    truncates from the left so the end of the completion, where the score is pooled, is kept.
    """

    def __init__(
        self,
        model_or_path: Any,
        tokenizer: Any = None,
        *,
        batch_size: int | None = None,
        max_length: int | None = None,
        **from_pretrained_kwargs: Any,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if isinstance(model_or_path, (str, Path)):
            source = str(model_or_path)
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=1, trust_remote_code=False, **from_pretrained_kwargs
            )
        else:
            model = model_or_path
            source = getattr(model.config, "_name_or_path", "") or ""
        if tokenizer is None:
            if not source:
                raise ValueError(
                    "RewardModel needs a tokenizer: the model has no path to load one "
                    "from. Pass tokenizer=..."
                )
            try:
                tokenizer = AutoTokenizer.from_pretrained(source)
            except Exception as err:
                raise ValueError(
                    f"Could not load the reward model's tokenizer from {source!r}; "
                    "pass tokenizer=..."
                ) from err
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(
                    "The reward tokenizer has neither a pad nor an EOS token; set "
                    "tokenizer.pad_token."
                )
            tokenizer.pad_token = tokenizer.eos_token
        # The classification head pools the rightmost non-pad token and refuses batches > 1
        # without a pad id, so the model must agree with the tokenizer on it.
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id

        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.__name__ = Path(source.rstrip("/")).name if source else type(model).__name__

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> RewardModel:
        self.model.to(device)
        return self

    def texts(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[str]:
        texts = []
        for prompt, completion in zip(prompts, completions, strict=True):
            if is_conversational(prompt) or is_conversational(completion):
                if not getattr(self.tokenizer, "chat_template", None):
                    raise ValueError(
                        f"Reward model {self.__name__!r}: conversational samples need "
                        "a tokenizer with a chat template, and this one has none."
                    )
                messages = _as_messages(prompt, "user") + _as_messages(completion, "assistant")
                texts.append(self.tokenizer.apply_chat_template(messages, tokenize=False))
            else:
                texts.append(str(prompt) + str(completion))
        return texts

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Any = None,
        **kwargs: Any,
    ) -> list[float]:
        texts = self.texts(prompts, completions)
        step = self.batch_size or max(len(texts), 1)
        scores: list[float] = []
        for start in range(0, len(texts), step):
            scores.extend(self._score(texts[start : start + step]))
        return scores

    def _score(self, texts: list[str]) -> list[float]:
        truncate = self.max_length is not None
        if truncate:
            self.tokenizer.truncation_side = "left"
        batch = self.tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            padding_side="right",
            truncation=truncate,
            max_length=self.max_length,
            add_special_tokens=False,
        ).to(self.device)
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]  # [b, S]
        # HF pools the rightmost token that is not the *model's* pad id; a tokenizer padding with
        # another id would make it pool a pad position, so padding is rewritten to the model's id.
        input_ids = input_ids.masked_fill(attention_mask == 0, self.model.config.pad_token_id)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # [b, L]
        if logits.ndim != 2:
            raise ValueError(
                f"Reward model {self.__name__!r} returned logits of shape "
                f"{tuple(logits.shape)}; expected [batch, num_labels] from a "
                "sequence-classification model."
            )
        return logits[:, 0].float().cpu().tolist()  # host sync: scores go to Python lists


def _as_messages(x: Any, role: str) -> list[dict[str, Any]]:
    return [dict(m) for m in x] if is_conversational(x) else [{"role": role, "content": str(x)}]
