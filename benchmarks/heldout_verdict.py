"""ftt-inspect's verdict scored on matrix seeds that no fit saw, on one or more miniatures.

    python benchmarks/heldout_verdict.py --calibration CAL.json [...] --heldout MATRIX.json [...] \
        --out benchmarks/results/NAME

Each file is the report of one ``ftt-demo --matrix`` run (``OUT/matrix-PRESET/report/matrix.json``
or a committed copy in benchmarks/results/). Held-out seeds are grouped by preset (miniature).
For each group:

* ``shipped``: the curve and thresholds of mergekit_ftt/inspect/verdict_calibration.json,
  applied without refitting;
* ``refit``: every compared statistic (``calibration.COMPARED``) fitted on the ``--calibration``
  seeds' pairs only and scored on the held-out ones: the same fit carried to another seed of
  the same miniature, or to another miniature.

With held-out seeds of more than one preset, the group ``all`` pools them (seeds named
"PRESET SEED").

A held-out seed that the calibration seeds or the shipped file contain (same preset and seed)
is refused (``calibration.check_heldout``). Per seed: Spearman ρ between the statistic and the
measured efficiency (sign flipped: higher is better), the curve's RMS error, level agreement;
with their mean, SD, min and max over the held-out seeds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mergekit_ftt.demo import calibration


def load(paths: list[Path]) -> list[tuple[str, dict]]:
    """(preset, seed summary) of every seed in the given matrix reports."""
    seeds = []
    for path in paths:
        matrix = json.loads(path.read_text(encoding="utf-8"))
        seeds += [(matrix["preset"], seed) for seed in matrix["seeds"]]
    return seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", nargs="+", type=Path, required=True)
    parser.add_argument("--heldout", nargs="+", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    calibrating, heldout = load(args.calibration), load(args.heldout)
    calibration.check_heldout(
        [(preset, seed["seed"]) for preset, seed in calibrating],
        [(preset, seed["seed"]) for preset, seed in heldout],
    )
    fit_seeds = [seed for _, seed in calibrating]
    presets = sorted({preset for preset, _ in heldout})
    fitted_on = ", ".join(f"{preset} seed {seed['seed']}" for preset, seed in calibrating)
    groups = {
        preset: calibration.heldout_report(
            fit_seeds,
            [seed for name, seed in heldout if name == preset],
            fitted_on=fitted_on,
        )
        for preset in presets
    }
    if len(presets) > 1:  # every held-out seed of every miniature, as one set
        groups["all"] = calibration.heldout_report(
            fit_seeds,
            [{**seed, "seed": f"{preset} {seed['seed']}"} for preset, seed in heldout],
            fitted_on=fitted_on,
        )
    summary = {
        "calibration": [str(path) for path in args.calibration],
        "calibration_seeds": [[preset, seed["seed"]] for preset, seed in calibrating],
        "heldout": [str(path) for path in args.heldout],
        "groups": groups,
    }
    lines = [f"Refits use {fitted_on}; nothing below was fitted on the seeds it scores.", ""]
    for preset, report in groups.items():
        title = "every held-out seed" if preset == "all" else f"{preset} preset"
        lines += [f"## Held out: {title}", "", calibration.heldout_text(report), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
