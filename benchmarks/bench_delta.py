"""Extract a delta and apply it, side by side with the three-model transfer, on make_checkpoints.py models.

Once, before the rounds and measured like them: ``ftt-delta extract`` from
``source_finetuned`` and ``source_base`` of each format the chosen variants apply (bf16
exact: the lossless default for bf16 models; float32 exact; bf16 rounded, ``--no-exact``).
Then, alternately in fresh processes (a b c d e, a b c d e, …):

- ``three_model``: ``mergekit-yaml`` with target, ``source_finetuned``, ``source_base``;
- ``apply_exact``: ``mergekit-yaml`` with target and the bf16 exact delta (``role: delta``);
- ``apply_float32``: the same with the float32 delta;
- ``apply_rounded``: the same with the bf16 rounded delta;
- ``extract``: ``ftt-delta extract`` of the bf16 exact delta (its memory is the claim).

Each run: wall, CPU, peak RSS and anonymous RSS of the process tree (bench_merge.py's
sampler). ``--verify`` compares, after the first round, each apply output with the
three-model output element by element. Writes ``benchmarks/results/delta-<size>-<date>-<HHMM>[-<label>].{md,json}``.

    python benchmarks/make_checkpoints.py 350m
    python benchmarks/bench_delta.py 350m --verify --mergekit-args '--out-shard-size 1B'
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import yaml

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

from bench_merge import (  # noqa: E402
    CACHE_NOTES,
    DEFAULT_CHECKPOINTS,
    DEFAULT_RESULTS,
    GB,
    Inputs,
    Run,
    measure,
    mergekit_command,
    set_cache,
    startup_run,
    summarize,
    transfer_config,
)
from harness import (  # noqa: E402
    command_line,
    page_top,
    result_start,
    result_stem,
    variant_rows,
    verification_lines,
    write_result,
)

FORMATS = {  # delta folder name -> ftt-delta extract options
    "bf16_exact": ["--dtype", "bfloat16"],
    "float32_exact": ["--dtype", "float32"],
    "bf16_rounded": ["--dtype", "bfloat16", "--no-exact"],
}
APPLIES = {
    "apply_exact": "bf16_exact",
    "apply_float32": "float32_exact",
    "apply_rounded": "bf16_rounded",
}
VARIANTS = ("three_model", *APPLIES, "extract")
LABELS = {
    "startup": "mergekit-yaml --help (start-up)",
    "three_model": "(a) three-model transfer",
    "apply_exact": "(b) apply delta, bf16 exact",
    "apply_float32": "(c) apply delta, float32 exact",
    "apply_rounded": "(d) apply delta, bf16 rounded",
    "extract": "(e) ftt-delta extract, bf16 exact",
}


def apply_config(target: Path, delta: Path) -> dict:
    return {
        "merge_method": "finetuning_transfer",
        "base_model": str(target),
        "dtype": "bfloat16",
        "models": [{"model": str(delta), "parameters": {"role": "delta", "weight": 1.0}}],
    }


def extract_command(inputs: Inputs, out: Path, options: list[str]) -> list[str]:
    return [
        "ftt-delta", "extract", str(out),
        "--finetuned", str(inputs.source_finetuned), "--base", str(inputs.source_base),
        *options,
    ]  # fmt: skip


def prepare(inputs: Inputs, workdir: Path, env: dict, variants: list[str]) -> dict:
    """Extract the formats the variants apply, once; write the recipes. Returns what each
    delta holds."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "three_model.yml").write_text(yaml.safe_dump(transfer_config(inputs)))
    held = {}
    for name, options in FORMATS.items():
        if not any(APPLIES.get(variant) == name for variant in variants):
            continue
        folder = workdir / f"delta-{name}"
        extraction = None
        if not (folder / "delta_config.json").exists():
            run = measure(
                f"prepare {name}", extract_command(inputs, folder, options), env,
                workdir / f"prepare-{name}.log",
            )  # fmt: skip
            if run.returncode:
                raise SystemExit(f"extracting {name} failed: {run.note}")
            extraction = asdict(run)
        config = json.loads((folder / "delta_config.json").read_text())
        elements = sum(_numel(t["shape"]) for t in config["tensors"].values())
        stored = sum(f["size"] for f in config["files"].values())
        held[name] = {
            "stored_bytes": stored,
            "bytes_per_element": stored / elements,
            "elements": elements,
            "exact_corrections": sum(t["corrections"] for t in config["tensors"].values()),
            "extraction": extraction,  # the run that made it (None: it was there already)
        }
    for variant, name in APPLIES.items():
        if name not in held:
            continue
        config = apply_config(inputs.target, workdir / f"delta-{name}")
        (workdir / f"{variant}.yml").write_text(yaml.safe_dump(config))
    return held


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def run_variant(variant: str, inputs: Inputs, workdir: Path, args, env, round_index) -> Run:
    output = workdir / f"out-{variant}"
    shutil.rmtree(output, ignore_errors=True)
    # Every input and delta file, whichever the variant reads.
    set_cache([*inputs.shards, *sorted(workdir.glob("delta-*/*.safetensors"))], args.cache)
    if variant == "extract":
        command = extract_command(inputs, output, FORMATS["bf16_exact"])
    else:
        command = mergekit_command(workdir / f"{variant}.yml", output, args.mergekit_args)
    return measure(variant, command, env, workdir / f"{variant}-{round_index}.log")


def compare(reference: Path, output: Path) -> dict:
    """Elements of ``output`` that differ from ``reference`` (same tensor names)."""
    import torch
    from safetensors import safe_open

    def files(path: Path) -> dict[str, Path]:
        index = path / "model.safetensors.index.json"
        if index.exists():
            return {k: path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        with safe_open(path / "model.safetensors", framework="pt") as handle:
            return dict.fromkeys(handle.keys(), path / "model.safetensors")

    expected, got = files(reference), files(output)
    if expected.keys() != got.keys():
        raise RuntimeError(f"{output} and {reference} hold different tensors")
    entry = {"elements": 0, "mismatched": 0, "max_abs_diff": 0.0}
    for name, path in expected.items():
        with safe_open(path, framework="pt") as a, safe_open(got[name], framework="pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
        differs = x != y
        entry["elements"] += x.numel()
        entry["mismatched"] += int(differs.sum())
        if differs.any():
            diff = float((x.to(torch.float64) - y.to(torch.float64)).abs().max())
            entry["max_abs_diff"] = max(entry["max_abs_diff"], diff)
    return entry


def render(result: dict) -> str:
    summary = result["summary"]
    startup = summary.get("startup", {}).get("wall_s", 0.0)

    def cells(variant: str, row: dict) -> list[str]:
        mergekit = variant in ("three_model", *APPLIES)
        ratios = result["ratios"].get(variant, {})
        return [
            f"{row['wall_s']:.1f}",
            f"{row['cpu_s']:.1f}",
            f"{row['peak_rss_gb']:.2f}",
            f"{row['peak_anon_gb']:.2f}",
            f"{row['wall_s'] - startup:.1f}" if mergekit else "–",
            *(format(ratios[key], ".2f") if ratios else "–" for key in ("wall", "work")),
        ]

    lines = page_top(
        "Delta benchmark",
        result,
        f"Median of {result['repeats']} alternating runs, each a fresh process. Page cache "
        f"(inputs and deltas): {CACHE_NOTES[result.get('cache', 'as-found')]}. Merge work = "
        "wall − `mergekit-yaml --help`. Ratios are per round (side by side), then the median.",
    )
    lines += [
        "| variant | wall s | CPU s | peak RSS GB | of it anonymous GB | merge work s | wall ÷ (a) | work ÷ (a) |",
        "|---|---|---|---|---|---|---|---|",
        *variant_rows(summary, LABELS.__getitem__, cells, width=7),
    ]
    lines += ["", "Delta folders (extracted once, before the rounds):", ""]
    lines += [
        "| format | GB | bytes per element | exact corrections | extraction: wall s, CPU s, anonymous GB |",
        "|---|---|---|---|---|",
    ]
    for name, held in result["deltas"].items():
        run = held.get("extraction")
        extraction = (
            f"{run['wall_s']:.1f}, {run['cpu_s']:.1f}, {run['peak_anon_bytes'] / GB:.2f}"
            if run
            else "(reused)"
        )
        lines.append(
            f"| {name} | {held['stored_bytes'] / GB:.3f} | {held['bytes_per_element']:.3f} | "
            f"{held['exact_corrections']:,} ({held['exact_corrections'] / held['elements']:.3%}) | "
            f"{extraction} |"
        )
    heading = "Elements of each apply output that differ from the three-model output:"
    lines += verification_lines(result, LABELS.__getitem__, heading)
    lines += [*command_line(result), ""]
    return "\n".join(lines)


def ratios(runs: dict[str, list[Run]], startup: list[Run]) -> dict:
    """Per round wall and work ratios against the three-model run of the same round."""
    out = {}
    for variant in APPLIES:
        pairs = [
            (a, b, s)
            for a, b, s in zip(
                runs.get(variant, []), runs.get("three_model", []), startup, strict=False
            )
            if a.returncode == 0 and b.returncode == 0
        ]
        if pairs:
            out[variant] = {
                "wall": statistics.median(a.wall_s / b.wall_s for a, b, _ in pairs),
                "work": statistics.median(
                    (a.wall_s - s.wall_s) / (b.wall_s - s.wall_s) for a, b, s in pairs
                ),
            }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("size")
    parser.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--workdir", type=Path, help="default: <checkpoints>/<size>/bench-delta")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("--mergekit-args", default="")
    parser.add_argument("--label", default="", help="appended to the result file names")
    parser.add_argument(
        "--cache",
        choices=sorted(CACHE_NOTES),
        default="as-found",
        help="page cache state of the inputs and deltas before each run (as bench_merge.py)",
    )
    args = parser.parse_args(argv)
    args.mergekit_args = tuple(args.mergekit_args.split())
    inputs = Inputs.for_size(args.checkpoints, args.size)
    workdir = args.workdir or args.checkpoints / args.size / "bench-delta"
    env = dict(os.environ)
    result = result_start(args.size, args.repeats)
    result["cache"] = args.cache
    variants = [v for v in args.variants.split(",") if v]
    result["deltas"] = prepare(inputs, workdir, env, variants)
    runs: dict[str, list[Run]] = {v: [] for v in variants}
    startup: list[Run] = []
    stem = result_stem(args.results, f"delta-{args.size}", result["started_utc"], args.label)
    bench_settings = argparse.Namespace(workdir=workdir, env=env)
    for round_index in range(args.repeats):
        startup.append(startup_run(bench_settings, round_index))
        for variant in variants:
            run = run_variant(variant, inputs, workdir, args, env, round_index)
            runs[variant].append(run)
            print(f"round {round_index + 1}: {variant}: {run.wall_s:.1f} s, "
                  f"{run.peak_anon_bytes / GB:.2f} GB anonymous {run.note}", flush=True)  # fmt: skip
            if not (args.verify and round_index == 0):  # an 8B output is 16 GB of disk
                shutil.rmtree(workdir / f"out-{variant}", ignore_errors=True)
        if round_index == 0 and args.verify and "three_model" in variants:
            result["verification"] = {
                v: compare(workdir / "out-three_model", workdir / f"out-{v}")
                for v in variants
                if v in APPLIES and runs[v][0].returncode == 0
            }
        for variant in variants:
            shutil.rmtree(workdir / f"out-{variant}", ignore_errors=True)
        result["load_average_end"] = os.getloadavg()
        result["runs"] = [asdict(r) for rs in (startup, *runs.values()) for r in rs]
        result["summary"] = {"startup": summarize(startup, 0)} | {
            v: summarize(rs, 0) for v, rs in runs.items()
        }
        result["ratios"] = ratios(runs, startup)
        write_result(stem, result, render(result))
    print(render(result))
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
