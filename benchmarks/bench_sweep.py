"""ftt-sweep against the same α grid done by hand: N × (mergekit-yaml + ftt-eval run).

On an ``ftt-demo`` output folder (its transfer recipe, models and lm-eval task), for the
α values given, alternating in fresh folders each round:

- ``sweep``: one ``ftt-sweep`` command (variants built in memory from one read of the
  inputs, each handed to lm-eval's hf backend);
- ``separate``: for each α, ``mergekit-yaml`` on that variant's recipe (the file the
  sweep writes for it) and ``ftt-eval run`` on the merged folder.

Both evaluate the demo's suite with the hf backend on CPU, one torch thread
(``OMP_NUM_THREADS=1``, the demo's default). Reported: wall seconds per round, medians,
the ratio separate / sweep, load averages, and whether both ways scored every α alike.

    ftt-demo --out /tmp/demo
    python benchmarks/bench_sweep.py /tmp/demo --work /tmp/bench-sweep --repeats 3

Writes ``benchmarks/results/sweep-speed-<date>.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def timed(commands: list[list[str]], log: Path) -> float:
    """Run ``commands`` one after another; wall seconds of all of them."""
    started = time.monotonic()
    with log.open("a") as out:
        for command in commands:
            out.write(f"$ {shlex.join(command)}\n")
            out.flush()
            result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=ENV)
            if result.returncode:
                raise SystemExit(f"{shlex.join(command)} failed; see {log}")
    return time.monotonic() - started


def write_recipes(recipe: Path, alphas: str, folder: Path) -> dict[str, Path]:
    """The recipe of each α, as ftt-sweep writes it: label -> file."""
    from mergekit_ftt.sweep import grid

    config = grid.load_recipe(recipe)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for variant in grid.make_variants(config, grid.parse_alphas(alphas), [], []):
        files[variant.label] = folder / f"{variant.label}.yml"
        files[variant.label].write_text(variant.to_yaml(recipe))
    return files


def scores(eval_dir: Path) -> dict[str, float]:
    from mergekit_ftt.eval.report import build_table

    table = build_table([eval_dir])
    (column,) = table.columns
    return {row.label: row.scores[column] for row in table.rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo", type=Path, help="an ftt-demo output folder")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (emptied)")
    parser.add_argument("--alphas", default="0,0.25,0.5,0.75,1,1.25,1.5")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(argv)

    recipe = args.demo / "transfer" / "transfer.yml"
    tasks = args.demo / "data" / "eval_tasks"
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    recipes = write_recipes(recipe, args.alphas, args.work / "recipes")
    log = args.work / "commands.log"
    eval_flags = ["--suite", "ftt-demo", "--include-path", str(tasks)]

    rounds = []
    for index in range(args.repeats):
        folder = args.work / f"round{index}"
        sweep_cmd = ["ftt-sweep", str(recipe), "--alphas", args.alphas, *eval_flags]
        sweep_cmd += ["--out", str(folder / "sweep")]
        separate = []
        for label, path in recipes.items():
            merged = folder / "merged" / label
            separate.append(["mergekit-yaml", str(path), str(merged)])
            output = ["--backend", "hf", "--output", str(folder / "separate")]
            separate.append(
                ["ftt-eval", "run", "--model", f"{label}={merged}", *eval_flags, *output]
            )
        load = [os.getloadavg()[0]]
        sweep_s = timed([sweep_cmd], log)
        load.append(os.getloadavg()[0])
        separate_s = timed(separate, log)
        load.append(os.getloadavg()[0])
        same = scores(folder / "sweep" / "eval") == scores(folder / "separate")
        timings = json.loads((folder / "sweep" / "sweep.json").read_text())["timings_s"]
        rounds.append(
            {
                "sweep_s": sweep_s,
                "separate_s": separate_s,
                "load_average": load,
                "same_scores": same,
                "sweep_variant_timings_s": timings,
                "scores": scores(folder / "sweep" / "eval"),
            }
        )
        print(
            f"round {index}: sweep {sweep_s:.1f} s, separate {separate_s:.1f} s, "
            f"load {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, same scores {same}",
            flush=True,
        )
        shutil.rmtree(folder / "merged", ignore_errors=True)

    sweep_median = statistics.median(r["sweep_s"] for r in rounds)
    separate_median = statistics.median(r["separate_s"] for r in rounds)
    n = len(recipes)
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with other jobs",
        "demo": str(args.demo),
        "alphas": args.alphas,
        "variants": n,
        "sweep_command": shlex.join(sweep_cmd),
        "separate_commands": [shlex.join(c) for c in separate[:2]],
        "rounds": rounds,
        "sweep_median_s": sweep_median,
        "separate_median_s": separate_median,
        "ratio": separate_median / sweep_median,
    }
    stem = args.results / f"sweep-speed-{dt.date.today().isoformat()}"
    args.results.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# ftt-sweep vs {n} × (mergekit-yaml + ftt-eval run), {result['date']}",
        "",
        f"Machine: {result['machine']}; `OMP_NUM_THREADS=1` for every command. Demo "
        f"folder `{args.demo}` (0.17M-parameter OLMo 2, float32, 60 chat questions).",
        "",
        f"- sweep: `{result['sweep_command']}`",
        f"- separate, per α: `{result['separate_commands'][0]}` then "
        f"`{result['separate_commands'][1]}`",
        "",
        "| round | sweep (s) | separate (s) | ratio | load avg (start / mid / end) | same scores |",
        "|---:|---:|---:|---:|---|---|",
    ]
    for index, r in enumerate(rounds):
        load = " / ".join(f"{v:.1f}" for v in r["load_average"])
        lines.append(
            f"| {index} | {r['sweep_s']:.1f} | {r['separate_s']:.1f} | "
            f"{r['separate_s'] / r['sweep_s']:.2f} | {load} | {r['same_scores']} |"
        )
    lines += [
        f"| median | {sweep_median:.1f} | {separate_median:.1f} | **{result['ratio']:.2f}** | | |",
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
