"""Print the README's side-by-side table from bench_merge.py result files.

python benchmarks/results_table.py benchmarks/results/350m-*.json benchmarks/results/1b-*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_merge import GB, LABELS, VARIANTS


def cell(result: dict, variant: str) -> str:
    """`wall s · CPU s · peak RSS (anon) GB · GB/s · work ÷ floor` for one size and variant."""
    summary = result["summary"]
    row = summary.get(variant)
    if row is None:
        return "not run"
    if "wall_s" not in row:
        return row["note"]
    startup = summary["startup"]["wall_s"]
    floor = summary.get("io_floor", {}).get("wall_s")
    work = row["wall_s"] - startup if variant in ("transfer", "task_arithmetic") else row["wall_s"]
    ratio = f" · {work / floor:.1f}× floor" if floor and variant != "io_floor" else ""
    arithmetic = summary.get("task_arithmetic", {}).get("wall_s")
    if variant == "transfer" and arithmetic:
        ratio += f" · {row['wall_s'] / arithmetic:.2f}× task_arithmetic"
    runs = f" ({row['ok']} run{'s' if row['ok'] > 1 else ''})" if row["ok"] < 3 else ""
    return (
        f"{row['wall_s']:.0f} s · {row['cpu_s']:.0f} CPU s · {row['peak_rss_gb']:.1f} "
        f"({row['peak_anon_gb']:.1f}) GB · {row['input_gb_per_s']:.2f} GB/s{ratio}{runs}"
    )


def table(results: list[dict]) -> str:
    header = "| | " + " | ".join(
        f"{r['size']} ({r['input_bytes'] / GB:.1f} GB in)" for r in results
    )
    lines = [header + " |", "|---" * (len(results) + 1) + "|"]
    for variant in VARIANTS:
        lines.append(
            f"| {LABELS[variant]} | " + " | ".join(cell(r, variant) for r in results) + " |"
        )
    startups = " | ".join(f"{r['summary']['startup']['wall_s']:.0f} s" for r in results)
    loads = " | ".join(
        f"{r['load_average_start'][0]:.1f} → {r['load_average_end'][0]:.1f}" for r in results
    )
    lines.append(f"| `mergekit-yaml --help` (start-up) | {startups} |")
    lines.append(f"| load average (1 min), start → end | {loads} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="<size>-<date>.json files")
    args = parser.parse_args(argv)
    print(table([json.loads(path.read_text()) for path in args.results]))


if __name__ == "__main__":
    main()
