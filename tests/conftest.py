"""Session fixtures: tiny local checkpoints for the merge tests (nothing from the Hub).

Shared helpers live in ``helpers.py``; test modules import from there, not from here.
"""

from __future__ import annotations

import sys

import pytest
from helpers import TinyFamily


@pytest.fixture(scope="session")
def llama(tmp_path_factory) -> TinyFamily:
    return TinyFamily(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def olmo2(tmp_path_factory) -> TinyFamily:
    return TinyFamily(tmp_path_factory.mktemp("olmo2"), "olmo2")


@pytest.fixture(scope="session")
def tied_llama(tmp_path_factory) -> TinyFamily:
    return TinyFamily(tmp_path_factory.mktemp("tied"), "llama", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def python_bin() -> str:
    return sys.executable
