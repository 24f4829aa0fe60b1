"""Fine-tuning transfer the way the paper's released script does it: load all three models.

The baseline that ``bench_merge.py`` compares ``finetuning_transfer`` with. It loads the
fine-tuned source, the source base and the target whole with transformers in bf16 (the
released script also asks for flash-attention 2, which only matters on a GPU), adds
``Δ = finetuned − source_base`` computed in float64 in place to the bf16 target
parameters (one rounding) and saves the target with the fine-tuned model's tokenizer.
Needs about three models' worth of RAM.

    python benchmarks/full_load_transfer.py --target T --source-finetuned FT \
        --source-base SB --output OUT
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def transfer(target: Path, source_finetuned: Path, source_base: Path, output: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(path: Path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)

    finetuned, base, merged = load(source_finetuned), load(source_base), load(target)
    finetuned_state, base_state = finetuned.state_dict(), base.state_dict()
    with torch.no_grad():
        for name, parameter in merged.state_dict().items():
            # In-place add of a float64 tensor: computed in float64, rounded once to bf16.
            parameter.add_(finetuned_state[name].double() - base_state[name].double())
    merged.save_pretrained(output)
    AutoTokenizer.from_pretrained(source_finetuned).save_pretrained(output)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--source-finetuned", type=Path, required=True)
    parser.add_argument("--source-base", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.output.exists():
        raise SystemExit(f"{args.output} exists; choose a new output folder")
    transfer(args.target, args.source_finetuned, args.source_base, args.output)


if __name__ == "__main__":
    main()
