"""``ftt-inspect`` against the transfer merge of the same three checkpoints, side by side.

Both read the same recipe (bench_merge.py's ``finetuning_transfer``, bfloat16) on
checkpoints from make_checkpoints.py; runs alternate (merge, inspect, merge, inspect, ...)
in fresh processes, measured by bench_merge's ``measure``: wall and CPU seconds, peak RSS
of the process tree and the anonymous part of it (RssAnon: safetensors maps the input
shards, so pages read are file-backed RSS, not memory the process allocated).

    python benchmarks/make_checkpoints.py 350m --out /work/ckpt
    python benchmarks/bench_inspect.py 350m --checkpoints /work/ckpt

Writes ``benchmarks/results/inspect-<size>-<date>.{md,json}``.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import yaml
from bench_merge import (
    DEFAULT_CHECKPOINTS,
    DEFAULT_RESULTS,
    GB,
    REPO,
    Inputs,
    measure,
    summarize,
    transfer_config,
)
from harness import command_line, page_top, result_start, variant_rows, write_result

LABELS = {"transfer": "mergekit-yaml (finetuning_transfer)", "inspect": "ftt-inspect"}


def commands(recipe: Path, workdir: Path, mergekit_args: list[str]) -> dict[str, list[str]]:
    return {
        "transfer": ["mergekit-yaml", str(recipe), str(workdir / "out"), "--quiet", *mergekit_args],
        "inspect": [
            "ftt-inspect", str(recipe), "--no-progress", "--json", str(workdir / "inspect.json")
        ],
    }  # fmt: skip


def render(result: dict) -> str:
    summary = result["summary"]
    merge_wall = summary["transfer"].get("wall_s")

    def cells(variant: str, row: dict) -> list[str]:
        return [
            f"{row['wall_s']:.1f}",
            f"{row['cpu_s']:.1f}",
            f"{row['peak_rss_gb']:.2f}",
            f"{row['peak_anon_gb']:.2f}",
            f"{row['wall_s'] / merge_wall:.2f}" if merge_wall else "–",
        ]

    lines = page_top(
        "ftt-inspect vs the transfer merge",
        result,
        f"Inputs {result['input_bytes'] / GB:.2f} GB (three checkpoints). Median of "
        f"{result['repeats']} alternating runs, each a fresh process, start-up included.",
    )
    lines += [
        "| command | wall s | CPU s | peak RSS GB | of it anonymous GB | wall ÷ merge |",
        "|---|---:|---:|---:|---:|---:|",
        *variant_rows(summary, LABELS.__getitem__, cells, width=4),
        *command_line(result),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("size", help="a size written by make_checkpoints.py (350m, 1b, llama3-8b)")
    parser.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--workdir", type=Path, help="default: <checkpoints>/<size>/bench-inspect")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--mergekit-args", default="--out-shard-size 1B", help="extra mergekit-yaml options"
    )
    args = parser.parse_args(argv)
    inputs = Inputs.for_size(args.checkpoints, args.size)
    workdir = args.workdir or args.checkpoints / args.size / "bench-inspect"
    workdir.mkdir(parents=True, exist_ok=True)
    recipe = workdir / "transfer.yml"
    recipe.write_text(yaml.safe_dump(transfer_config(inputs), sort_keys=False))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    variants = commands(recipe, workdir, args.mergekit_args.split())
    result = result_start(
        args.size, args.repeats, input_bytes=inputs.total_bytes, commands=variants
    )
    runs: dict[str, list] = {variant: [] for variant in variants}
    for round_index in range(args.repeats):
        for variant, command in variants.items():
            shutil.rmtree(workdir / "out", ignore_errors=True)
            run = measure(variant, command, env, workdir / f"{variant}-{round_index}.log")
            runs[variant].append(run)
            print(
                f"round {round_index + 1}: {variant}: {run.wall_s:.1f} s, anonymous "
                f"{run.peak_anon_bytes / GB:.2f} GB {run.note}",
                flush=True,
            )
    shutil.rmtree(workdir / "out", ignore_errors=True)
    result["load_average_end"] = os.getloadavg()
    result["runs"] = [vars(run) for variant_runs in runs.values() for run in variant_runs]
    result["summary"] = {v: summarize(rs, inputs.total_bytes) for v, rs in runs.items()}
    stem = args.results / f"inspect-{args.size}-{result['started_utc'][:16].replace(':', '')}"
    write_result(stem, result, render(result))
    print(render(result))
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
