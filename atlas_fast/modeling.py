"""Loading models and tokenizers from local folders or hub ids, exactly as they were saved."""
from __future__ import annotations

from pathlib import Path


def load_causal_lm(source: str | Path, trust_remote_code: bool = False, **init_kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(source), trust_remote_code=trust_remote_code, **init_kwargs)


def load_tokenizer(source: str | Path, trust_remote_code: bool = False):
    """The tokenizer exactly as saved. transformers 5's AutoTokenizer rebuilds the tokenizer of
    some model types (qwen2, phi3, ...) as their registered class whatever tokenizer_config.json
    declares, which changes the ids of a custom tokenizer saved as a plain tokenizers-backed one.
    Such a folder is loaded from its tokenizer.json directly; everything else goes through
    AutoTokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.models.auto.tokenization_auto import get_tokenizer_config

    source = str(source)
    declared = get_tokenizer_config(source)
    if declared.get("tokenizer_class") in ("PreTrainedTokenizerFast", "TokenizersBackend") and "auto_map" not in declared:
        return PreTrainedTokenizerFast.from_pretrained(source)
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
