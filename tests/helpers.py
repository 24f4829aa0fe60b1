"""What several test modules share: tiny local checkpoints, recipes, running commands.

Test modules import this module (``from helpers import ...``), never each other; the
fixtures that hand these out live in ``conftest.py``. Nothing here comes from the Hub.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from mergekit_ftt.merge_methods.reference import FORMATS, rounded  # noqa: F401 (re-exported)
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


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a console command the way a user types it, offline unless ``env`` says otherwise."""
    return subprocess.run(
        list(args), cwd=cwd, env=env or OFFLINE_ENV, capture_output=True, text=True, timeout=600
    )


def error_line(run: subprocess.CompletedProcess, prog: str) -> str:
    """The one ``PROG: error: ...`` line a failed ``ftt-*`` command prints, with no traceback."""
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

    def model(
        self, name: str, seed: int, extra_vocab: bool = False, dtype: str = "bfloat16"
    ) -> Path:
        """A checkpoint; ``extra_vocab`` adds 8 tokens and rows (the Tülu 3 case)."""
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
            save_random_model(config, path, seed=seed, tokenizer=tokenizer, dtype=dtype)
        return path


def transfer_recipe(target, finetuned, source_base, **extra) -> dict:
    """A finetuning_transfer recipe; ``finetuned`` is a list of (path, weight)."""
    models = [
        {"model": str(path), "parameters": {"role": "source_finetuned", "weight": weight}}
        for path, weight in finetuned
    ]
    models.append({"model": str(source_base), "parameters": {"role": "source_base"}})
    return {
        "merge_method": "finetuning_transfer",
        "base_model": str(target),
        "dtype": "bfloat16",
        "models": models,
        **extra,
    }


def merge(
    recipe: dict,
    tmp_path: Path,
    command: tuple[str, ...] = ("mergekit-yaml",),
    options: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
):
    """Write ``recipe`` and merge it into ``tmp_path/out`` with a real command."""
    config = tmp_path / "recipe.yml"
    config.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    return run_cli(*command, str(config), str(out), *options, env=env), out


def reference(
    target, pairs, source_base, rows=None, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """float64 ``target + Σ w (ft − source_base)`` rounded once to ``dtype``, per tensor."""
    result = {}
    for name, target_tensor in target.items():
        total = torch.zeros(target_tensor.shape, dtype=torch.float64)
        for weights, weight in pairs:
            finetuned = weights[name][: target_tensor.shape[0]] if rows else weights[name]
            total += weight * (finetuned.double() - source_base[name].double())
        result[name] = rounded((total + target_tensor.double()).numpy(), dtype)
    return result


def nothing_written(out: Path) -> bool:
    """The output folder was not created, or is still empty."""
    return not out.exists() or not any(out.iterdir())
