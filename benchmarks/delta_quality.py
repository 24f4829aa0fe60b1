"""The demo's M_b + Δ_a with compressed deltas against the exact delta, over ftt-demo seeds.

For each finished ``ftt-demo`` output folder (full mode, one per seed):

1. ``ftt-delta extract`` Δ_a = FT(M_a) − M_a in each format below;
2. ``mergekit-yaml`` M_b + Δ_a with the delta as a ``role: delta`` input (the demo's recipe
   otherwise: dtype float32, the fine-tuned tokenizer, which the delta folder carries);
3. evaluate every merged model with ``mergekit_ftt.eval`` on the demo's held-out task,
   exactly as ``ftt-demo`` evaluates (hf backend on CPU, float32, chat template, greedy).

The exact delta's output is also compared with the demo's own three-model transfer, bit
for bit. Writes ``benchmarks/results/delta-quality-<date>.{md,json}``.

    for s in 0 1 2; do ftt-demo --seed $s --out demo-seed$s; done
    python benchmarks/delta_quality.py demo-seed0 demo-seed1 demo-seed2 --work delta-quality
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))

from mergekit_ftt.demo.pipeline import (  # noqa: E402
    EVAL_SUITE,
    FT_A,
    M_A,
    M_B,
    TRANSFER,
    Layout,
)

# label -> ftt-delta extract options (the demo's models are float32)
FORMATS = {
    "exact (float32)": ["--dtype", "float32"],
    "bf16, rounded": ["--dtype", "bfloat16", "--no-exact"],
    "magnitude 30%": ["--compress", "magnitude", "--density", "0.3"],
    "magnitude 10%": ["--compress", "magnitude", "--density", "0.1"],
    "DARE 30%": ["--compress", "dare", "--density", "0.3"],
    "DARE 10%": ["--compress", "dare", "--density", "0.1"],
    "sign, row scales": ["--compress", "sign", "--scale", "row"],
    "sign, matrix scale": ["--compress", "sign", "--scale", "matrix"],
}
COLUMN = "Sums (chat, exact match)"


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).strip("-").lower()


def run(command: list[str], log: Path) -> None:
    with open(log, "w") as output:
        result = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, check=False)
    if result.returncode:
        raise SystemExit(f"{shlex.join(command)} failed; see {log}")


def apply_recipe(layout: Layout, delta: Path) -> dict:
    return {
        "merge_method": "finetuning_transfer",
        "base_model": str(layout.model(M_B).resolve()),
        "models": [{"model": str(delta.resolve()), "parameters": {"role": "delta", "weight": 1.0}}],
        "dtype": "float32",
        "tokenizer": {"source": str(delta.resolve())},
    }


def build(layout: Layout, work: Path, label: str, options: list[str]) -> tuple[Path, dict]:
    """Extract one format and merge M_b + Δ_a with it (skipped when already done)."""
    folder = work / slug(label)
    folder.mkdir(parents=True, exist_ok=True)
    delta, merged = folder / "delta", folder / "merged"
    if not (delta / "delta_config.json").exists():
        run(
            ["ftt-delta", "extract", str(delta), "--finetuned", str(layout.model(FT_A)),
             "--base", str(layout.model(M_A)), *options],
            folder / "extract.log",
        )  # fmt: skip
    if not (merged / "config.json").exists():
        recipe = folder / "apply.yml"
        recipe.write_text(yaml.safe_dump(apply_recipe(layout, delta), sort_keys=False))
        run(["mergekit-yaml", str(recipe), str(merged), "--quiet"], folder / "merge.log")
    info = subprocess.run(
        ["ftt-delta", "info", str(delta), "--json"], capture_output=True, text=True, check=True
    )
    return merged, json.loads(info.stdout)


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    def weights(path: Path) -> dict:
        out = {}
        for shard in sorted(path.glob("*.safetensors")):
            out.update(load_file(shard))
        return out

    x, y = weights(a), weights(b)
    return x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)


def evaluate(layout: Layout, work: Path, merged: dict[str, Path]) -> dict[str, float]:
    from mergekit_ftt.eval import BackendOptions, ModelSpec, build_table, evaluate_models

    labels = {label: f"M_b + Δ_a [{label}]" for label in merged}
    evaluate_models(
        [
            ModelSpec(labels[label], str(path.resolve()), base=None)
            for label, path in merged.items()
        ],
        EVAL_SUITE,
        work / "eval",
        backend="hf",
        options=BackendOptions(device="cpu", dtype="float32", batch_size=1),
        include_path=[layout.tasks],
        log_samples=True,
    )
    table = build_table([work / "eval" / labels[label] for label in merged])
    return {label: table.score(table.row(labels[label]), COLUMN) for label in merged}


def demo_scores(layout: Layout) -> dict[str, float]:
    results = json.loads((layout.report / "results.json").read_text())
    return {label: results[label]["scores"][COLUMN] for label in (M_B, FT_A, TRANSFER)}


def render(result: dict) -> str:
    seeds = result["seeds"]
    header = " | ".join(f"seed {s}" for s in seeds)
    lines = [
        f"# Compressed deltas on the demo: M_b + Δ_a, {result['started_utc']}",
        "",
        "Accuracy (%) on the demo's 60 held-out chat questions (ftt-demo full mode); Δ_a "
        "extracted with `ftt-delta extract` from FT(M_a) and M_a, applied to M_b with "
        "`mergekit-yaml` (`role: delta`), evaluated as ftt-demo evaluates. Size: stored bytes "
        "per element of Δ (the float32 models take 4); error: ‖decoded − Δ‖/‖Δ‖ (seed 0).",
        "",
        f"| delta | {header} | mean | bytes per element | relative error |",
        "|---|" + "---:|" * (len(seeds) + 3),
    ]
    for label in FORMATS:
        scores = [result["scores"][str(s)][label] for s in seeds]
        facts = result["deltas"][str(seeds[0])][label]
        lines.append(
            f"| {label} | "
            + " | ".join(f"{v:.1f}" for v in scores)
            + f" | {statistics.mean(scores):.1f} | {facts['bytes_per_element']:.3f} | "
            f"{facts['relative_error']:.3f} |"
        )
    for reference in (TRANSFER, FT_A, M_B):
        scores = [result["demo"][str(s)][reference] for s in seeds]
        name = {TRANSFER: "ftt-demo's own M_b + Δ_a (three models)"}.get(reference, reference)
        lines.append(
            f"| {name} | "
            + " | ".join(f"{v:.1f}" for v in scores)
            + f" | {statistics.mean(scores):.1f} | | |"
        )
    lines += [
        "",
        "The exact delta's merged weights equal ftt-demo's three-model transfer bit for bit: "
        + ", ".join(f"seed {s}: {result['bit_identical'][str(s)]}" for s in seeds)
        + ".",
        "",
        f"Machine load average {result['load_average_start']} → {result['load_average_end']}. "
        f"Command: `{result['command']}`",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demos", nargs="+", type=Path, help="finished ftt-demo output folders")
    parser.add_argument("--work", type=Path, default=Path("delta-quality"))
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc)
    result = {
        "started_utc": started.isoformat(timespec="seconds"),
        "command": "python " + shlex.join(sys.argv),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "seeds": [],
        "scores": {},
        "deltas": {},
        "demo": {},
        "bit_identical": {},
    }
    for demo in args.demos:
        settings = json.loads((demo / "demo.json").read_text())["settings"]
        if settings["preset"] != "full":
            raise SystemExit(f"{demo} is a --quick run; the table is for full-mode runs")
        seed, layout = settings["seed"], Layout(demo)
        work = args.work / f"seed{seed}"
        merged, facts = {}, {}
        for label, options in FORMATS.items():
            print(f"seed {seed}: {label}", flush=True)
            merged[label], info = build(layout, work, label, options)
            facts[label] = {
                key: info[key]
                for key in ("stored_bytes", "bytes_per_element", "relative_error", "elements")
            }
        result["seeds"].append(seed)
        result["deltas"][str(seed)] = facts
        result["bit_identical"][str(seed)] = same_weights(
            merged["exact (float32)"], layout.model(TRANSFER)
        )
        result["scores"][str(seed)] = evaluate(layout, work, merged)
        result["demo"][str(seed)] = demo_scores(layout)
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    stem = args.results / f"delta-quality-{result['started_utc'][:10]}"
    args.results.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
