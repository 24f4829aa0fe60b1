"""Print the README's side-by-side table from bench_merge.py result files.

python benchmarks/results_table.py benchmarks/results/350m-*.json benchmarks/results/1b-*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_merge import GB, is_mergekit, label


def cell(result: dict, variant: str) -> str:
    """`wall s (min–max) · CPU s · peak RSS (anon) GB · ratios` for one size and variant."""
    summary = result["summary"]
    row = summary.get(variant)
    if row is None:
        return "not run"
    if "wall_s" not in row:
        return row["note"]
    startup = summary["startup"]["wall_s"]
    floor = summary.get("io_floor", {}).get("wall_s")
    mergekit = is_mergekit(variant)
    ratios = []
    if floor and variant != "io_floor":
        ratios.append(f"{row['wall_s'] / floor:.2f}× floor")
        if mergekit:
            ratios.append(f"work {(row['wall_s'] - startup) / floor:.2f}× floor")
    arithmetic = summary.get("task_arithmetic", {}).get("wall_s")
    if mergekit and variant != "task_arithmetic" and arithmetic:
        ratios.append(f"{row['wall_s'] / arithmetic:.2f}× task_arithmetic")
    low, high = row.get("wall_s_range", (row["wall_s"], row["wall_s"]))
    spread = f" ({low:.0f}–{high:.0f})" if row["ok"] > 1 else " (1 run)"
    return " · ".join(
        [
            f"{row['wall_s']:.0f} s{spread}",
            f"{row['cpu_s']:.0f} CPU s",
            f"{row['peak_rss_gb']:.1f} ({row['peak_anon_gb']:.1f}) GB",
            *ratios,
        ]
    )


def regime(result: dict) -> str:
    """The page-cache regime of a result: the cache option and what was resident."""
    resident = [
        run["resident_input_fraction"]
        for run in result["runs"]
        if run.get("resident_input_fraction") is not None and run["variant"] != "startup"
    ]
    found = f", {min(resident) * 100:.0f}–{max(resident) * 100:.0f}% resident" if resident else ""
    return f"{result.get('cache', 'as-found')}{found}"


def table(results: list[dict]) -> str:
    header = "| | " + " | ".join(
        f"{r['size']} ({r['input_bytes'] / GB:.1f} GB in)" for r in results
    )
    lines = [header + " |", "|---" * (len(results) + 1) + "|"]
    variants = [v for v in results[0]["summary"] if v != "startup"]
    for variant in variants:
        lines.append(
            f"| {label(variant)} | " + " | ".join(cell(r, variant) for r in results) + " |"
        )
    startups = " | ".join(f"{r['summary']['startup']['wall_s']:.0f} s" for r in results)
    loads = " | ".join(
        f"{r['load_average_start'][0]:.1f} → {r['load_average_end'][0]:.1f}" for r in results
    )
    lines.append(f"| `mergekit-yaml --help` (start-up) | {startups} |")
    lines.append(f"| load average (1 min), start → end | {loads} |")
    lines.append(f"| page cache before each run | {' | '.join(regime(r) for r in results)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="<size>-<date>.json files")
    args = parser.parse_args(argv)
    print(table([json.loads(path.read_text()) for path in args.results]))


if __name__ == "__main__":
    main()
