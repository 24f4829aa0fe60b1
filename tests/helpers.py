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

from mergekit_ftt.reference import rounded
from mergekit_ftt.tiny import build_tokenizer, save_random_model, tiny_config_for

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
            config = tiny_config_for(
                tokenizer, self.architecture, tie_word_embeddings=self.tie_word_embeddings
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


def stored_delta_recipe(family: TinyFamily, folder: Path) -> Path:
    """``folder/delta`` extracted by ``ftt-delta extract`` (ft_a − source_base) and
    ``folder/delta.yml``, a recipe that applies it to the target with `role: delta`."""
    delta = folder / "delta"
    extracted = run_cli(
        "ftt-delta", "extract", str(delta), "--finetuned", str(family.model("ft_a", 3)),
        "--base", str(family.model("source_base", 2)), "--no-source-hash",
    )  # fmt: skip
    assert extracted.returncode == 0, extracted.stderr
    recipe = {
        "merge_method": "finetuning_transfer",
        "base_model": str(family.model("target", 1)),
        "dtype": "bfloat16",
        "models": [{"model": str(delta), "parameters": {"role": "delta", "weight": 1.0}}],
    }
    path = folder / "delta.yml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def cpu_train_config(path: Path, data: Path, **settings) -> Path:
    """A short ``ftt-train`` config on CPU over the chat rows of ``data`` (JSONL), written
    to ``path``; ``settings`` override its values."""
    config = {
        "datasets": [{"path": "json", "data_files": str(data), "columns": ["messages"]}],
        "dataset_num_proc": 1, "chat_template": "tulu", "max_length": 128,
        "learning_rate": 1.0e-2, "max_steps": 3, "per_device_train_batch_size": 8,
        "use_cpu": True, "bf16": False, "activation_checkpointing": False,
        "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
    }  # fmt: skip
    path.write_text(yaml.safe_dump({**config, **settings}))
    return path


# A local lm-eval task: two sums, generated answers, exact match.
TASK_YAML = """\
task: tiny_sum
dataset_path: json
dataset_kwargs: {data_files: {test: DATA}}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{question}} A:"
doc_to_target: "{{answer}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 2, do_sample: false}
metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]
metadata: {version: 1.0}
"""


def write_tiny_task(folder: Path, data_path: str | None = None) -> Path:
    """lm-eval task ``tiny_sum`` in ``folder`` (give it as --include-path); its data file
    is named as ``data_path`` (default: its absolute path)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "sums.jsonl"
    data.write_text('{"question": "1+1", "answer": "2"}\n{"question": "2+2", "answer": "4"}\n')
    (folder / "tiny.yaml").write_text(TASK_YAML.replace("DATA", data_path or str(data)))
    return folder
