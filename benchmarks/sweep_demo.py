"""The α sweep on ftt-demo's miniature, over several seeds: does α > 1 help, does a module
kind matter most?

For each seed: ``ftt-demo --seed S`` (skipped when its output is finished), then
``ftt-sweep`` on the demo's transfer recipe with α ∈ {0, 0.25, …, 1.5} on all tensors and
per module kind (attention, mlp, embeddings; the other tensors at α = 1), evaluated on
the demo's held-out chat test (60 questions, exact match, hf backend on CPU). Both run
with one torch thread (``OMP_NUM_THREADS=1``), the demo's default. A rerun resumes.

    python benchmarks/sweep_demo.py --work /tmp/sweep-demo --seeds 0,1,2

Writes ``benchmarks/results/sweep-demo-<date>.{md,json,png}``: per seed and module kind
the score at each α, the mean over seeds, and each seed's best α.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ALPHAS = "0,0.25,0.5,0.75,1,1.25,1.5"
MODULES = "attention,mlp,embeddings"
KIND_TITLES = {
    "all": "α on all tensors",
    "attention": "α on attention (rest at 1)",
    "mlp": "α on MLP (rest at 1)",
    "embeddings": "α on embeddings (rest at 1)",
}


def load_average() -> float:
    return os.getloadavg()[0]


def run(command: list[str], log: Path) -> float:
    """Run ``command`` with one torch thread, output to ``log``; return wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    with log.open("w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    if result.returncode:
        raise SystemExit(f"{shlex.join(command)} failed ({result.returncode}); see {log}")
    return time.monotonic() - started


def demo_finished(folder: Path) -> bool:
    record = folder / "demo.json"
    return record.exists() and "main" in json.loads(record.read_text())["finished"]


def sweep_seed(work: Path, seed: int) -> dict:
    demo = work / f"demo-seed{seed}"
    if not demo_finished(demo):
        print(f"seed {seed}: ftt-demo", flush=True)
        run(["ftt-demo", "--seed", str(seed), "--out", str(demo)], work / f"demo-seed{seed}.log")
    out = work / f"sweep-seed{seed}"
    command = [
        "ftt-sweep",
        str(demo / "transfer" / "transfer.yml"),
        "--alphas",
        ALPHAS,
        "--suite",
        "ftt-demo",
        "--include-path",
        str(demo / "data" / "eval_tasks"),
        "--modules",
        MODULES,
        "--out",
        str(out),
    ]
    print(f"seed {seed}: {shlex.join(command)}", flush=True)
    load_before = load_average()
    seconds = run(command, work / f"sweep-seed{seed}.log")
    report = json.loads((out / "report" / "report.json").read_text())
    return {
        "seed": seed,
        "command": shlex.join(command),
        "wall_s": seconds,
        "load_average": [load_before, load_average()],
        "report": report,
    }


def aggregate(seeds: list[dict]) -> dict:
    """kind -> α -> per-seed scores and their mean; kind -> per-seed best α."""
    column = seeds[0]["report"]["columns"][0]
    curves: dict[str, dict[float, list[float]]] = {}
    for entry in seeds:
        for kind, points in entry["report"]["curves"].items():
            for point in points:
                curves.setdefault(kind, {}).setdefault(point["alpha"], []).append(
                    point["scores"][column]
                )
    return {
        "column": column,
        "curves": {
            kind: {
                alpha: {"seeds": scores, "mean": statistics.mean(scores)}
                for alpha, scores in sorted(points.items())
            }
            for kind, points in curves.items()
        },
        "best_alpha": {
            kind: [entry["report"]["best_alpha"][kind][column] for entry in seeds]
            for kind in curves
        },
    }


def to_markdown(summary: dict, seeds: list[dict], machine: str) -> str:
    ids = [entry["seed"] for entry in seeds]
    lines = [
        f"# ftt-sweep on the ftt-demo miniature, {dt.date.today().isoformat()}",
        "",
        f"Machine: {machine}. Per seed: `{seeds[0]['command']}` (its demo folder for that "
        "seed), with `OMP_NUM_THREADS=1`; "
        + "; ".join(
            f"seed {e['seed']}: {e['wall_s']:.0f} s, load {e['load_average'][0]:.1f} → "
            f"{e['load_average'][1]:.1f}"
            for e in seeds
        )
        + ".",
        "",
        f"Score: {summary['column']} (%, 60 held-out questions). Other tensors at α = 1 in "
        "the per-module rows; their α = 1 is the same model as all tensors at α = 1.",
        "",
    ]
    for kind, points in summary["curves"].items():
        lines += [
            f"## {KIND_TITLES[kind]}",
            "",
            "| α | " + " | ".join(f"seed {s}" for s in ids) + " | mean |",
            "|---:|" + "---:|" * (len(ids) + 1),
        ]
        best_mean = max(p["mean"] for p in points.values())
        for alpha, point in points.items():
            mean = f"{point['mean']:.1f}"
            mean = f"**{mean}**" if point["mean"] == best_mean else mean
            cells = " | ".join(f"{s:.1f}" for s in point["seeds"])
            lines.append(f"| {alpha:g} | {cells} | {mean} |")
        best = " | ".join(f"{a:g}" for a in summary["best_alpha"][kind])
        lines += [f"| best α | {best} | |", ""]
    return "\n".join(lines)


def plot(summary: dict, seeds: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(summary["curves"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds) + 1, 3.8), sharey=True)
    for ax, kind in zip(axes, kinds, strict=True):
        points = summary["curves"][kind]
        alphas = list(points)
        for index, entry in enumerate(seeds):
            ax.plot(
                alphas,
                [p["seeds"][index] for p in points.values()],
                marker=".",
                alpha=0.5,
                label=f"seed {entry['seed']}",
            )
        ax.plot(alphas, [p["mean"] for p in points.values()], "k-", marker="o", label="mean")
        ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.set_title(KIND_TITLES[kind], fontsize=9)
        ax.set_xlabel("α")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{summary['column']} (%)")
    axes[-1].legend(fontsize=8)
    fig.suptitle("ftt-sweep on the ftt-demo miniature: M_b + α·Δ_a")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="demo and sweep folders")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    seeds = [sweep_seed(args.work, int(s)) for s in args.seeds.split(",")]
    summary = aggregate(seeds)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared"
    stem = args.results / f"sweep-demo-{dt.date.today().isoformat()}"
    args.results.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(
        json.dumps({"machine": machine, "seeds": seeds, "summary": summary}, indent=2) + "\n"
    )
    stem.with_suffix(".md").write_text(to_markdown(summary, seeds, machine))
    plot(summary, seeds, stem.with_suffix(".png"))
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
