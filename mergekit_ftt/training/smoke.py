"""Inputs for a CPU smoke run of ``ftt-train``: a tiny OLMo 2 and Tülu-format data.

    python -m mergekit_ftt.training.smoke out/smoke
    ftt-train --config cpu_smoke
    mergekit-yaml recipes/cpu_smoke_transfer.yml out/smoke/transfer

writes ``out/smoke/train.jsonl`` (columns id, prompt, messages, like the Tülu 3 SFT
datasets), ``out/smoke/base`` (a random tiny OLMo 2 with its tokenizer, the model to
fine-tune) and ``out/smoke/target`` (the same weights plus a small seeded perturbation,
standing in for a later pre-training checkpoint), so that the fine-tuned model goes
straight into ``recipes/cpu_smoke_transfer.yml``.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from mergekit_ftt import tiny


def arithmetic_rows(count: int, seed: int) -> list[dict]:
    """Single-turn Tülu-format rows: an addition question and its worked answer."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        question = f"Tom has {a} apples and buys {b} more. How many apples does he have?"
        answer = f"He has {a} + {b} = {a + b} apples. The answer is {a + b}."
        rows.append(
            {
                "id": f"smoke_{index}",
                "prompt": question,
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ],
            }
        )
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def make_smoke_inputs(
    folder: str | Path,
    rows: int = 256,
    seed: int = 0,
    architecture: tiny.Architecture = "olmo2",
) -> Path:
    """Write the smoke-run data, base model and target model under ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    data = arithmetic_rows(rows, seed)
    write_jsonl(data, folder / "train.jsonl")
    corpus = [message["content"] for row in data for message in row["messages"]]
    tokenizer = tiny.build_tokenizer(corpus, vocab_size=320)
    config = tiny.tiny_config_for(tokenizer, architecture)
    base = tiny.save_random_model(config, folder / "base", seed=seed, tokenizer=tokenizer)
    target = AutoModelForCausalLM.from_pretrained(base)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in target.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    target.save_pretrained(folder / "target")
    tokenizer.save_pretrained(folder / "target")
    return folder


if __name__ == "__main__":
    make_smoke_inputs(sys.argv[1] if len(sys.argv) > 1 else "out/smoke")
