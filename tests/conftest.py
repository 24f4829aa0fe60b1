"""Session fixtures: tiny local checkpoints for the merge tests (nothing from the Hub).

Shared helpers live in ``helpers.py``; test modules import from there, not from here.
"""

from __future__ import annotations

import os
import sys

import pytest
from helpers import OFFLINE_ENV, TinyFamily

# Everything a command caches (Hugging Face hub and datasets, the delta-file record of
# mergekit-ftt, numba's compiled kernels) goes to the test session's temporary folder,
# never to the user's home: tests write only under pytest's temporary paths.
CACHE_VARIABLES = ("XDG_CACHE_HOME", "HF_HOME", "NUMBA_CACHE_DIR")


@pytest.fixture(scope="session", autouse=True)
def isolated_caches(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    saved = {name: os.environ.get(name) for name in CACHE_VARIABLES}
    for name in CACHE_VARIABLES:
        os.environ[name] = OFFLINE_ENV[name] = str(cache / name.lower())
    yield cache
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
            OFFLINE_ENV.pop(name, None)
        else:
            os.environ[name] = OFFLINE_ENV[name] = value


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
