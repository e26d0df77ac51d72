"""Loading models and tokenizers from local folders or hub ids, exactly as they were saved."""
from __future__ import annotations

import os
from pathlib import Path


def missing_local_source(source: str | Path) -> bool:
    """Whether `source` names a local folder (a path, not an org/name hub id) that is not there:
    transformers would answer with a message about hub repo ids instead."""
    text = str(source)
    local = text.startswith(("/", ".", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text)
    return local and not os.path.exists(os.path.expanduser(text))


def check_source(source: str | Path) -> None:
    if missing_local_source(source):
        raise FileNotFoundError(f"{source} does not exist (a local folder, or a hub id like org/name)")


def load_causal_lm(source: str | Path, trust_remote_code: bool = False, **init_kwargs):
    from transformers import AutoModelForCausalLM

    check_source(source)
    return AutoModelForCausalLM.from_pretrained(str(source), trust_remote_code=trust_remote_code, **init_kwargs)


def load_tokenizer(source: str | Path, trust_remote_code: bool = False):
    """The tokenizer exactly as saved. transformers 5's AutoTokenizer rebuilds the tokenizer of
    some model types (qwen2, phi3, ...) as their registered class whatever tokenizer_config.json
    declares, which changes the ids of a custom tokenizer saved as a plain tokenizers-backed one.
    Such a folder is loaded from its tokenizer.json directly; everything else goes through
    AutoTokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.models.auto.tokenization_auto import get_tokenizer_config

    check_source(source)
    source = str(source)
    declared = get_tokenizer_config(source)
    if declared.get("tokenizer_class") in ("PreTrainedTokenizerFast", "TokenizersBackend") and "auto_map" not in declared:
        return PreTrainedTokenizerFast.from_pretrained(source)
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
