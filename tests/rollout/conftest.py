"""Fixtures shared by the rollout tests."""
from __future__ import annotations

import pytest

from tiny import char_tokenizer


@pytest.fixture(scope="module")
def tok():
    """The offline character tokenizer of tests/tiny.py (read-only: tests never change it)."""
    return char_tokenizer()
