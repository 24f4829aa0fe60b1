"""ftt-inspect's shipped verdict scored on matrices its calibration never saw.

    python benchmarks/heldout_verdict.py MATRIX.json [MATRIX.json ...] --out benchmarks/results/NAME

Each MATRIX.json is the report of one ``ftt-demo --matrix`` run (``OUT/matrix-*/report/*.json``,
or a committed copy in benchmarks/results/). The curve and thresholds are those of
mergekit_ftt/inspect/verdict_calibration.json, applied without refitting; seeds listed in
that file's ``runs.seeds`` are refused for the preset they were fitted on, so every figure here
is held out. Per seed: Spearman ρ between S and measured efficiency (sign flipped: higher is
better), the curve's RMS error, and the pairs each level got.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics as stats
from pathlib import Path

from mergekit_ftt.demo.calibration import spearman
from mergekit_ftt.inspect.verdict import calibration, predicted_efficiency, thresholds


def seed_figures(seed: dict) -> dict:
    curve = calibration()["curve"]
    points = [
        (pair["verdict"]["value"], pair["efficiency"])
        for pair in seed["pairs"]
        if pair["efficiency"] is not None and pair["verdict"]["value"] is not None
    ]
    values, measured = zip(*points, strict=True)
    errors = [predicted_efficiency(v, **curve) - e for v, e in points]
    limits = thresholds()
    bands = {"likely": [], "partial": [], "unlikely": []}
    for value, efficiency in points:
        band = (
            "likely"
            if value <= limits["likely_below"]
            else "partial"
            if value < limits["unlikely_above"]
            else "unlikely"
        )
        bands[band].append(efficiency)
    return {
        "seed": seed["seed"],
        "pairs": len(points),
        "spearman": -spearman(list(values), list(measured)),
        "rms_error": math.sqrt(sum(e * e for e in errors) / len(errors)),
        "bands": {
            band: {"pairs": len(v), "median_efficiency": stats.median(v) if v else None}
            for band, v in bands.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("matrices", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    shipped = calibration()
    rows = []
    for path in args.matrices:
        matrix = json.loads(path.read_text(encoding="utf-8"))
        for seed in matrix["seeds"]:
            if matrix["preset"] == "full" and seed["seed"] in shipped["runs"]["seeds"]:
                raise SystemExit(f"{path}: seed {seed['seed']} was used by the calibration")
            rows.append({"matrix": str(path), "preset": matrix["preset"], **seed_figures(seed)})
    rho = [r["spearman"] for r in rows]
    rms = [r["rms_error"] for r in rows]
    pooled = math.sqrt(
        sum(r["rms_error"] ** 2 * r["pairs"] for r in rows) / sum(r["pairs"] for r in rows)
    )
    summary = {
        "calibration_version": shipped["version"],
        "seeds": rows,
        "spearman": {"mean": stats.mean(rho), "min": min(rho), "max": max(rho)},
        "rms_error": {"per_seed_min": min(rms), "per_seed_max": max(rms), "pooled": pooled},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    lines = [
        f"Held-out check of verdict calibration v{shipped['version']} (no refitting).",
        "",
        "| matrix | seed | pairs | Spearman ρ | RMS error | likely / partial / unlikely (median eff.) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        bands = " / ".join(
            f"{b['pairs']} ({b['median_efficiency']:.2f})" if b["pairs"] else "0"
            for b in r["bands"].values()
        )
        lines.append(
            f"| {Path(r['matrix']).name} ({r['preset']}) | {r['seed']} | {r['pairs']} | "
            f"{r['spearman']:.2f} | {r['rms_error']:.3f} | {bands} |"
        )
    lines += [
        "",
        f"Spearman ρ mean {summary['spearman']['mean']:.2f} ({min(rho):.2f}–{max(rho):.2f}); "
        f"RMS error {min(rms):.3f}–{max(rms):.3f} per seed, {pooled:.3f} pooled.",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
