"""Tiny local checkpoints for the merge tests: nothing comes from the Hub."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergekit_ftt.tiny import build_tokenizer, save_random_model, tiny_config

# Subprocesses must never try the network; mergekit's model card asks the Hub about
# anything that looks like a repo id.
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

CORPUS = [
    "the sum of 23 and 17 is 40. twelve plus nine equals twenty-one.",
    "fine-tuning transfer adds a weight difference to a new base model.",
    "<|user|>\nwhat is 2 + 2?\n<|assistant|>\n4",
] * 20

EXTRA_TOKENS = [f"<|tool_{index}|>" for index in range(8)]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a console command the way a user types it, offline, capturing its output."""
    return subprocess.run(
        list(args), cwd=cwd, env=OFFLINE_ENV, capture_output=True, text=True, timeout=600
    )


def error_line(run: subprocess.CompletedProcess, prog: str) -> str:
    """The one ``PROG: error: ...`` line a failed command prints, with no traceback."""
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    (line,) = [line for line in run.stderr.splitlines() if line.startswith(f"{prog}: error:")]
    return line


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        weights.update(load_file(shard))
    return weights


class TinyFamily:
    """Tokenizers and random checkpoints of one architecture, made once per session."""

    def __init__(self, root: Path, architecture: str, tie_word_embeddings: bool = False):
        self.root = root
        self.tokenizer = build_tokenizer(CORPUS, vocab_size=300)
        self.extended_tokenizer = build_tokenizer(CORPUS, vocab_size=300, extra_tokens=EXTRA_TOKENS)
        self.architecture = architecture
        self.tie_word_embeddings = tie_word_embeddings

    def model(self, name: str, seed: int, extra_vocab: bool = False) -> Path:
        """A bf16 checkpoint; ``extra_vocab`` adds 8 tokens and rows (the Tülu 3 case)."""
        path = self.root / name
        if not (path / "config.json").exists():
            tokenizer = self.extended_tokenizer if extra_vocab else self.tokenizer
            config = tiny_config(
                self.architecture,
                vocab_size=len(tokenizer),
                tie_word_embeddings=self.tie_word_embeddings,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            save_random_model(config, path, seed=seed, tokenizer=tokenizer, dtype="bfloat16")
        return path


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
