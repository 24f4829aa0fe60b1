"""How well ftt-inspect's statistics predict transfer: the miniature Table 3's bookkeeping.

Research code of ``ftt-demo --matrix``, outside the ftt-inspect command: the command reads
only the calibration file this produces (mergekit_ftt/inspect/verdict_calibration.json).

``ftt-demo --matrix`` (mergekit_ftt/demo/matrix.py) trains, merges and evaluates; this
module turns its scores and ftt-inspect reports into transfer efficiencies, Spearman
correlations per candidate statistic, tables laid out like the paper's Table 3, and a
scatter plot. The verdict's thresholds (:mod:`mergekit_ftt.inspect.verdict`) were chosen
from this output.
"""

from __future__ import annotations

import json
import math
import statistics as stats
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mergekit_ftt.inspect.verdict import (
    LIKELY,
    UNLIKELY,
    predicted_efficiency,
    statistics_key,
    thresholds,
)
from mergekit_ftt.inspect.verdict import (
    calibration as shipped_calibration,
)

# A target whose own fine-tuning gains less than this (accuracy points) gives no
# meaningful efficiency: the denominator would be noise.
MIN_GAIN = 5.0


def ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n, ties sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda index: values[index])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        stop = start
        while stop + 1 < len(order) and values[order[stop + 1]] == values[order[start]]:
            stop += 1
        for position in range(start, stop + 1):
            result[order[position]] = (start + stop) / 2 + 1
        start = stop + 1
    return result


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation with ties (Pearson's r of tie-averaged ranks); None for
    fewer than 3 points or a constant side."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} x values but {len(y)} y values")
    if len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    mean_x, mean_y = sum(rx) / len(rx), sum(ry) / len(ry)
    covariance = sum((a - mean_x) * (b - mean_y) for a, b in zip(rx, ry, strict=True))
    spread = math.sqrt(sum((a - mean_x) ** 2 for a in rx) * sum((b - mean_y) ** 2 for b in ry))
    return covariance / spread if spread else None


def efficiency(target: float, finetuned: float, transferred: float) -> float | None:
    """(score(M_t + Δ) − score(M_t)) / (score(FT(M_t)) − score(M_t)); None when FT(M_t)
    gains less than MIN_GAIN points over M_t."""
    gain = finetuned - target
    return None if gain < MIN_GAIN else (transferred - target) / gain


def candidates(report: dict) -> dict[str, float | None]:
    """The statistics of one ftt-inspect report tried as predictors of efficiency."""
    statistics = report["statistics"]
    values = {
        f"model.{key}": value for key, value in statistics["model"].items() if key != "elements"
    }
    for kind in ("attention", "mlp", "embeddings", "norms"):
        entry = statistics["module_kinds"].get(kind, {})
        for key in ("gap_to_delta", "cosine", "relative_gap"):
            values[f"{kind}.{key}"] = entry.get(key)
    layers = statistics["layers"]
    ratios = [entry["gap_to_delta"] for entry in layers if entry["gap_to_delta"] is not None]
    cosines = [entry["cosine"] for entry in layers if entry["cosine"] is not None]
    values["layers.max_gap_to_delta"] = max(ratios, default=None)
    values["layers.min_cosine"] = min(cosines, default=None)
    return values


def correlate(rows: Sequence[dict]) -> dict[str, float | None]:
    """Spearman ρ of every candidate statistic with efficiency over ``rows`` (pairs)."""
    usable = [row for row in rows if row["efficiency"] is not None]
    names = sorted({name for row in usable for name in row["candidates"]})
    result = {}
    for name in names:
        points = [
            (row["candidates"][name], row["efficiency"])
            for row in usable
            if row["candidates"].get(name) is not None
        ]
        result[name] = spearman([x for x, _ in points], [y for _, y in points])
    return result


def fit_curve(points: Sequence[tuple[float, float]]) -> dict[str, float]:
    """Least-squares fit of efficiency ≈ 1 / (1 + (S / s50)^k) to (S, efficiency) points:
    a grid over log s50 (a quarter of the smallest S to four times the largest) and k
    (0.5 to 10), then a finer grid around the best."""
    values = [s for s, _ in points]
    if not points or min(values) <= 0:
        raise ValueError("fit_curve needs points with a positive statistic")

    def loss(s50: float, k: float) -> float:
        return sum((predicted_efficiency(s, s50, k) - e) ** 2 for s, e in points)

    low, high = math.log(min(values) / 4), math.log(max(values) * 4)
    best = (math.inf, 1.0, 1.0)
    for i in range(201):
        s50 = math.exp(low + (high - low) * i / 200)
        for j in range(96):
            best = min(best, (loss(s50, 0.5 + 0.1 * j), s50, 0.5 + 0.1 * j))
    _, s50, k = best
    for i in range(-30, 31):
        for j in range(-20, 21):
            candidate = (s50 * math.exp(0.002 * i), k + 0.005 * j)
            best = min(best, (loss(*candidate), *candidate))
    residual, s50, k = best
    return {"s50": s50, "k": k, "rms_error": math.sqrt(residual / len(points))}


def seed_summary(
    seed: int, names: Sequence[str], scores: dict[str, float], pairs: Sequence[dict]
) -> dict:
    """One seed's measurements. ``scores`` holds every model's accuracy by label: each
    checkpoint name, ``FT(name)`` and each pair's label; ``pairs`` has target, source,
    label and the ftt-inspect report of each ordered pair."""
    rows = []
    for pair in pairs:
        target = pair["target"]
        rows.append(
            {
                "target": target,
                "source": pair["source"],
                "label": pair["label"],
                "score": scores[pair["label"]],
                "efficiency": efficiency(
                    scores[target], scores[f"FT({target})"], scores[pair["label"]]
                ),
                "verdict": pair["report"]["verdict"],
                "candidates": candidates(pair["report"]),
            }
        )
    return {
        "seed": seed,
        "checkpoints": list(names),
        "scores": scores,
        "pairs": rows,
        "correlations": correlate(rows),
    }


def across_seeds(seeds: Sequence[dict]) -> list[dict]:
    """Per candidate: ρ in each seed, their mean, min and max, and ρ of all pairs pooled;
    sorted by |mean ρ|, the strongest first."""
    names = sorted({name for seed in seeds for name in seed["correlations"]})
    pooled = correlate([row for seed in seeds for row in seed["pairs"]])
    table = []
    for name in names:
        per_seed = [seed["correlations"].get(name) for seed in seeds]
        known = [rho for rho in per_seed if rho is not None]
        table.append(
            {
                "statistic": name,
                "per_seed": per_seed,
                "mean": stats.fmean(known) if known else None,
                "min": min(known, default=None),
                "max": max(known, default=None),
                "pooled": pooled.get(name),
            }
        )
    table.sort(key=lambda entry: -abs(entry["mean"] or 0))
    return table


def _points(seeds: Sequence[dict], statistic: str | None = None) -> list[tuple[float, float]]:
    """(statistic, efficiency) of every pair with both; default: the verdict's statistic."""
    name = statistic or f"model.{statistics_key()}"
    return [
        (row["candidates"][name], row["efficiency"])
        for seed in seeds
        for row in seed["pairs"]
        if row["efficiency"] is not None and row["candidates"].get(name)
    ]


def calibrate(seeds: Sequence[dict]) -> dict:
    """The verdict's curve fitted on every seed's pairs, its thresholds, the efficiencies
    measured in each band, and the fit of every seed left out in turn."""
    fit = fit_curve(_points(seeds))
    limits = thresholds(fit["s50"], fit["k"])
    bands: dict[str, list[float]] = {"likely": [], "partial": [], "unlikely": []}
    for value, measured in _points(seeds):
        if value <= limits["likely_below"]:
            bands["likely"].append(measured)
        elif value < limits["unlikely_above"]:
            bands["partial"].append(measured)
        else:
            bands["unlikely"].append(measured)
    held_out = []
    for index, seed in enumerate(seeds):
        others = [s for i, s in enumerate(seeds) if i != index]
        if not others:
            continue
        partial_fit = fit_curve(_points(others))
        test = _points([seed])
        error = sum(
            (predicted_efficiency(v, partial_fit["s50"], partial_fit["k"]) - e) ** 2
            for v, e in test
        )
        held_out.append(
            {
                "seed": seed["seed"],
                "fit_on_others": partial_fit,
                "thresholds": thresholds(partial_fit["s50"], partial_fit["k"]),
                "rms_error": math.sqrt(error / len(test)) if test else None,
            }
        )
    return {
        "statistic": statistics_key(),
        "fit": fit,
        "thresholds": limits,
        "bands": {
            band: {
                "pairs": len(values),
                "median_efficiency": stats.median(values) if values else None,
                "min": min(values, default=None),
                "max": max(values, default=None),
            }
            for band, values in bands.items()
        },
        "leave_one_seed_out": held_out,
    }


# --- held out by construction -----------------------------------------------------------

# Statistics compared on held-out seeds: the verdict's own and the distances that ranked as
# well in-sample (docs/inspect.md), per module kind and normalised by ‖Δ‖ or by ‖M_s‖.
COMPARED = (
    "model.gap_to_delta",
    "model.relative_gap",
    "attention.gap_to_delta",
    "mlp.gap_to_delta",
    "norms.gap_to_delta",
    "embeddings.gap_to_delta",
    "layers.max_gap_to_delta",
    "attention.relative_gap",
    "mlp.relative_gap",
)


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` or ``"3-5"`` (or a mix, ``"0,3-5"``) as seed numbers, in the given order."""
    seeds: list[int] = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"seeds {text!r}: give numbers such as 0,1,2 or 3-5")
        seeds += range(int(first), int(last or first) + 1)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {text!r}: a seed is listed twice")
    return tuple(seeds)


@dataclass(frozen=True)
class SeedSplit:
    """Seeds whose pairs fit the curve (``calibration``, may be empty: then only the shipped
    calibration is scored) and seeds it is scored on (``heldout``); never the same seed."""

    calibration: tuple[int, ...]
    heldout: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.heldout:
            raise ValueError("give at least one held-out seed")
        shared = sorted(set(self.calibration) & set(self.heldout))
        if shared:
            raise ValueError(
                f"seed(s) {', '.join(map(str, shared))} are both calibration and held-out "
                "seeds: a held-out figure must come from seeds the fit never saw"
            )

    @property
    def seeds(self) -> tuple[int, ...]:
        return (*self.calibration, *self.heldout)

    def to_dict(self) -> dict:
        return {"calibration": list(self.calibration), "heldout": list(self.heldout)}

    def parts(self, seeds: Sequence[dict]) -> tuple[list[dict], list[dict]]:
        """The calibration and held-out seeds' summaries among ``seeds``."""
        by_number = {seed["seed"]: seed for seed in seeds}
        missing = [number for number in self.seeds if number not in by_number]
        if missing:
            raise ValueError(f"no measurements for seed(s) {', '.join(map(str, missing))}")
        return [by_number[n] for n in self.calibration], [by_number[n] for n in self.heldout]


def shipped_seeds(preset: str) -> tuple[int, ...]:
    """The seeds of ``preset`` that verdict_calibration.json was fitted on."""
    runs = shipped_calibration()["runs"]
    return tuple(runs["seeds"]) if preset == runs.get("preset", "full") else ()


def measured_level(efficiency: float) -> str:
    """The level a pair's measured efficiency falls in, with the verdict's cut-offs."""
    return "likely" if efficiency >= LIKELY else "unlikely" if efficiency <= UNLIKELY else "partial"


def score_seed(seed: dict, statistic: str, s50: float, k: float) -> dict:
    """How the curve (s50, k) on ``statistic`` predicts one seed's measured efficiencies:
    Spearman ρ (sign flipped: higher is better), RMS error, the pairs each level got with their
    median efficiency, and the share of pairs whose level matches the measured one. A seed
    with no pair whose efficiency could be measured (every FT(Mi) gained less than MIN_GAIN)
    gets None for each figure."""
    points = _points([seed], statistic)
    limits = thresholds(s50, k)
    bands: dict[str, list[float]] = {"likely": [], "partial": [], "unlikely": []}
    agree = 0
    for value, measured in points:
        level = (
            "likely"
            if value <= limits["likely_below"]
            else "partial"
            if value < limits["unlikely_above"]
            else "unlikely"
        )
        bands[level].append(measured)
        agree += level == measured_level(measured)
    errors = [predicted_efficiency(value, s50, k) - measured for value, measured in points]
    rho = spearman([v for v, _ in points], [e for _, e in points])
    verdicts = [row["verdict"] for row in seed["pairs"] if "verdict" in row]
    return {
        "seed": seed["seed"],
        "pairs": len(points),
        # pairs ftt-inspect itself called out of its calibrated range (scored here anyway)
        "out_of_range": sum(not verdict.get("in_range", True) for verdict in verdicts),
        "spearman": None if rho is None else -rho,
        "rms_error": math.sqrt(stats.fmean(e * e for e in errors)) if points else None,
        "level_agreement": agree / len(points) if points else None,
        "bands": {
            band: {"pairs": len(v), "median_efficiency": stats.median(v) if v else None}
            for band, v in bands.items()
        },
    }


def spread(rows: Sequence[dict]) -> dict:
    """Mean, standard deviation, min and max over held-out seeds of ρ, RMS error and level
    agreement; the RMS error also pooled over every pair."""

    def describe(key: str) -> dict | None:
        values = [row[key] for row in rows if row[key] is not None]
        if not values:
            return None
        return {
            "mean": stats.fmean(values),
            "sd": stats.stdev(values) if len(values) > 1 else None,
            "min": min(values),
            "max": max(values),
        }

    measured = [row for row in rows if row["pairs"]]
    pooled = sum(row["rms_error"] ** 2 * row["pairs"] for row in measured)
    pairs = sum(row["pairs"] for row in measured)
    return {
        "seeds": len(rows),
        "spearman": describe("spearman"),
        "rms_error": None
        if not pairs
        else {**describe("rms_error"), "pooled": math.sqrt(pooled / pairs)},
        "level_agreement": describe("level_agreement"),
    }


def heldout_report(
    calibrating: Sequence[dict],
    heldout: Sequence[dict],
    compared: Sequence[str] = COMPARED,
    fitted_on: str | None = None,
) -> dict:
    """Held-out figures. ``shipped``: verdict_calibration.json's curve, unrefitted, on every
    held-out seed; ``refit``: per statistic in ``compared``, the curve fitted on the
    ``calibrating`` seeds' pairs only (none: no refit) and scored on the held-out ones;
    ``fitted_on`` names those seeds in the text (default "seeds 0, 1, 2"). Callers
    make sure no held-out seed is a calibrating one or one the shipped file saw
    (:class:`SeedSplit`, :func:`shipped_seeds`)."""
    curve = shipped_calibration()["curve"]
    shipped_rows = [
        score_seed(seed, f"model.{statistics_key()}", curve["s50"], curve["k"]) for seed in heldout
    ]
    report = {
        "calibration_seeds": [seed["seed"] for seed in calibrating],
        "fitted_on": fitted_on or f"seeds {', '.join(str(seed['seed']) for seed in calibrating)}",
        "heldout_seeds": [seed["seed"] for seed in heldout],
        "shipped": {
            "version": shipped_calibration()["version"],
            "statistic": f"model.{statistics_key()}",
            "curve": curve,
            "per_seed": shipped_rows,
            "spread": spread(shipped_rows),
        },
        "refit": [],
    }
    for statistic in compared:
        points = _points(calibrating, statistic)
        if not points:  # no calibrating seed, or none that has this statistic
            continue
        fit = fit_curve(points)
        rows = [score_seed(seed, statistic, fit["s50"], fit["k"]) for seed in heldout]
        report["refit"].append(
            {"statistic": statistic, "fit": fit, "per_seed": rows, "spread": spread(rows)}
        )
    report["refit"].sort(
        key=lambda entry: (_pooled(entry["spread"]) is None, _pooled(entry["spread"]) or 0)
    )
    return report


def check_heldout(
    calibrating: Sequence[tuple[str, int]], heldout: Sequence[tuple[str, int]]
) -> None:
    """Refuse a held-out (preset, seed) that the refit (``calibrating``) or the shipped
    calibration (:func:`shipped_seeds`) was fitted on: a held-out figure never sees its fit."""
    seen = set(calibrating) | {(p, n) for p, _ in heldout for n in shipped_seeds(p)}
    used = sorted(set(heldout) & seen)
    if used:
        names = ", ".join(f"{preset} seed {seed}" for preset, seed in used)
        raise ValueError(
            f"{names}: used by the calibration (the refit's seeds or those of "
            "verdict_calibration.json), so not held out; choose other held-out seeds"
        )


def matrix_heldout(seeds: Sequence[dict], split: SeedSplit, preset: str) -> dict:
    """:func:`heldout_report` for one matrix run's ``split``."""
    check_heldout([(preset, n) for n in split.calibration], [(preset, n) for n in split.heldout])
    return heldout_report(*split.parts(seeds))


def _pooled(spread_: dict) -> float | None:
    """The pooled RMS error of a :func:`spread` (None when no pair was measured)."""
    return None if spread_["rms_error"] is None else spread_["rms_error"]["pooled"]


def _spread_cell(entry: dict | None, digits: int) -> str:
    if entry is None:
        return "–"
    sd = "" if entry["sd"] is None else f" ± {entry['sd']:.{digits}f}"
    return f"{entry['mean']:.{digits}f}{sd} ({entry['min']:.{digits}f}–{entry['max']:.{digits}f})"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table: the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _bands_cell(bands: dict) -> str:
    return " / ".join(
        f"{b['pairs']} ({b['median_efficiency']:.2f})" if b["pairs"] else "0"
        for b in bands.values()
    )


def heldout_text(report: dict) -> str:
    """The held-out figures as Markdown: the shipped curve per seed, then every refitted
    statistic's spread (mean ± SD (min–max) over the held-out seeds)."""
    shipped, total = report["shipped"], report["shipped"]["spread"]
    header = ["seed", "pairs (out of range)", "Spearman ρ", "RMS error", "level agreement"]
    lines = [
        f"Held-out seeds {', '.join(map(str, report['heldout_seeds']))}: the shipped "
        f"calibration (v{shipped['version']}, {shipped['statistic']}, s50 "
        f"{shipped['curve']['s50']}, k {shipped['curve']['k']}), not refitted. Levels from its "
        "thresholds for every pair, also those ftt-inspect called out of its calibrated range "
        "(counted in brackets); level agreement: the share of pairs whose measured efficiency "
        f"falls in the predicted level's band (likely ≥ {LIKELY}, unlikely ≤ {UNLIKELY}).",
        "",
        *_table(
            [*header, "likely / partial / unlikely (median eff.)"],
            [
                [
                    str(row["seed"]),
                    f"{row['pairs']} ({row['out_of_range']})",
                    _cell(row["spearman"], 2),
                    _cell(row["rms_error"], 3),
                    _cell(row["level_agreement"], 2),
                    _bands_cell(row["bands"]),
                ]
                for row in shipped["per_seed"]
            ],
        ),
        "",
        f"Mean ± SD (min–max) over {total['seeds']} held-out seed(s): Spearman ρ "
        f"{_spread_cell(total['spearman'], 2)}; RMS error {_spread_cell(total['rms_error'], 3)}, "
        f"pooled {_cell(_pooled(total), 3)}; level agreement "
        f"{_spread_cell(total['level_agreement'], 2)}.",
    ]
    if report["refit"]:
        lines += [
            "",
            f"Each statistic's curve fitted on {report['fitted_on']} only and scored on the held-out "
            "seeds (mean ± SD (min–max); best pooled RMS first):",
            "",
            *_table(
                ["statistic", "s50, k", *header[2:4], "pooled RMS", header[4]],
                [
                    [
                        entry["statistic"],
                        f"{entry['fit']['s50']:.3g}, {entry['fit']['k']:.2f}",
                        _spread_cell(entry["spread"]["spearman"], 2),
                        _spread_cell(entry["spread"]["rms_error"], 3),
                        _cell(_pooled(entry["spread"]), 3),
                        _spread_cell(entry["spread"]["level_agreement"], 2),
                    ]
                    for entry in report["refit"]
                ],
            ),
        ]
    return "\n".join(lines)


def calibration_text(calibration: dict) -> str:
    fit, limits = calibration["fit"], calibration["thresholds"]
    lines = [
        f"Fit over all pairs: efficiency ≈ 1 / (1 + ({statistics_key()} / {fit['s50']:.3f})^{fit['k']:.2f}), "
        f"RMS error {fit['rms_error']:.3f}; predicted efficiency {LIKELY} at "
        f"{limits['likely_below']:.3f}, {UNLIKELY} at {limits['unlikely_above']:.3f}.",
        "",
        "| band | pairs | median efficiency | min–max |",
        "|---|---:|---:|---:|",
    ]
    for band, entry in calibration["bands"].items():
        lines.append(
            f"| {band} | {entry['pairs']} | {_cell(entry['median_efficiency'], 2)} | "
            f"{_cell(entry['min'], 2)} – {_cell(entry['max'], 2)} |"
        )
    if calibration["leave_one_seed_out"]:
        lines += [
            "",
            "| seed left out | s50, k fitted on the others | thresholds | RMS error on it |",
        ]
        lines.append("|---|---|---|---:|")
        for entry in calibration["leave_one_seed_out"]:
            partial, held = entry["fit_on_others"], entry["thresholds"]
            lines.append(
                f"| {entry['seed']} | {partial['s50']:.3f}, {partial['k']:.2f} | "
                f"{held['likely_below']:.3f} / {held['unlikely_above']:.3f} | "
                f"{_cell(entry['rms_error'], 3)} |"
            )
    return "\n".join(lines)


def _cell(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def seed_tables(seed: dict) -> str:
    """Table 3's layout: one row per target Mi with Mi, FT(Mi) and Mi + Δj for every j (the
    diagonal Mi + Δi is FT(Mi) itself); then the efficiency and ftt-inspect's score of each
    Mi + Δj."""
    names, scores = seed["checkpoints"], seed["scores"]
    by_pair = {(row["target"], row["source"]): row for row in seed["pairs"]}
    transfers = " | ".join(f"+Δ{name[1:]}" for name in names)

    def matrix(title: str, cell, own_scores: bool) -> list[str]:
        own = "base | FT | " if own_scores else ""
        lines = [
            f"**{title}**",
            "",
            f"| | {own}{transfers} |",
            "|---|" + "---:|" * (len(names) + 2 * own_scores),
        ]
        for target in names:
            cells = [
                "·" if (row := by_pair.get((target, source))) is None else cell(row)
                for source in names
            ]
            if own_scores:
                cells = [_cell(scores[target]), _cell(scores[f"FT({target})"]), *cells]
            lines.append(f"| {target} | " + " | ".join(cells) + " |")
        return [*lines, ""]

    lines = [f"### seed {seed['seed']}", ""]
    lines += matrix("accuracy (%)", lambda row: _cell(row["score"]), own_scores=True)
    lines += matrix("transfer efficiency", lambda row: _cell(row["efficiency"], 2), False)
    lines += matrix(
        "ftt-inspect score (predicted efficiency)",
        lambda row: f"{row['verdict']['score']:.2f} {row['verdict']['level'][0]}",
        False,
    )
    return "\n".join(lines)


def correlation_table(table: Sequence[dict], seeds: Sequence[int], top: int | None = None) -> str:
    lines = [
        "| statistic | "
        + " | ".join(f"ρ seed {s}" for s in seeds)
        + " | mean | min–max | pooled |",
        "|---|" + "---:|" * (len(seeds) + 3),
    ]
    for entry in table[:top]:
        lines.append(
            f"| {entry['statistic']} | "
            + " | ".join(_cell(rho, 2) for rho in entry["per_seed"])
            + f" | {_cell(entry['mean'], 2)} | {_cell(entry['min'], 2)} – {_cell(entry['max'], 2)}"
            f" | {_cell(entry['pooled'], 2)} |"
        )
    return "\n".join(lines)


def _split_of(summary: dict) -> SeedSplit | None:
    split = summary.get("split")
    return (
        None if split is None else SeedSplit(tuple(split["calibration"]), tuple(split["heldout"]))
    )


def calibration_sections(summary: dict) -> dict:
    """The JSON report's ``calibration`` (the curve fitted on every seed, or with a split on
    its calibration seeds only; None when it has none) and, with a split, ``heldout``."""
    split = _split_of(summary)
    if split is None:
        return {"calibration": calibrate(summary["seeds"])}
    calibrating, _ = split.parts(summary["seeds"])
    return {
        "calibration": calibrate(calibrating) if calibrating else None,
        "heldout": matrix_heldout(summary["seeds"], split, summary["preset"]),
    }


def markdown(summary: dict) -> str:
    seeds = summary["seeds"]
    table = across_seeds(seeds)
    load = summary["load_average"]
    sections = calibration_sections(summary)
    fitted = sections["calibration"]
    split = _split_of(summary)
    title = (
        "### Calibration of the verdict"
        if split is None
        else f"### Calibration of the verdict on seeds {', '.join(map(str, split.calibration))} "
        "only (in-sample)"
    )
    calibration_lines = [title, "", calibration_text(fitted), ""] if fitted else []
    if split is not None:
        calibration_lines += [
            "### Held out: seeds the fit never saw",
            "",
            heldout_text(sections["heldout"]),
            "",
        ]
    lines = [
        f"## Miniature Table 3 ({summary['preset']}, {len(seeds)} seed(s))",
        "",
        "Rows: the target Mi; +Δj: Mi + (FT(Mj) − Mj) by mergekit-multi (finetuning_transfer); "
        "efficiency = (score(Mi + Δj) − score(Mi)) / (score(FT(Mi)) − score(Mi)), – where "
        f"FT(Mi) gains less than {MIN_GAIN:g} points; diagonal (·) = FT(Mi) itself; "
        "ftt-inspect's level: l likely, p partial, u unlikely, o out of calibrated range.",
        "",
        *(seed_tables(seed) for seed in seeds),
        "### Spearman ρ of each candidate statistic with transfer efficiency",
        "",
        correlation_table(table, [seed["seed"] for seed in seeds]),
        "",
        *calibration_lines,
        f"Verdict statistic: {statistics_key()}. This invocation (stages finished before are skipped): "
        f"wall time {summary['wall_seconds']:.0f} s, CPU time {summary['cpu_seconds']:.0f} s; "
        f"load average {load['start'][0]:.1f} at the start, {load['end'][0]:.1f} at the end.",
    ]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> Path:
    """Efficiency against the verdict's statistic, one colour per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for seed in summary["seeds"]:
        points = _points([seed])
        ax.scatter([x for x, _ in points], [y for _, y in points], label=f"seed {seed['seed']}")
    points = _points(summary["seeds"])
    split = _split_of(summary)
    fitted_on = summary["seeds"] if split is None else split.parts(summary["seeds"])[0]
    if points:
        if fitted_on:
            fit, name = fit_curve(_points(fitted_on)), "fit"
            if split is not None:
                name = f"fit on seeds {', '.join(map(str, split.calibration))}"
        else:
            fit = shipped_calibration()["curve"]
            name = f"shipped v{shipped_calibration()['version']}"
        low, high = min(x for x, _ in points) * 0.8, max(x for x, _ in points) * 1.2
        xs = [low * (high / low) ** (i / 100) for i in range(101)]
        ax.plot(
            xs,
            [predicted_efficiency(x, fit["s50"], fit["k"]) for x in xs],
            color="black",
            lw=1,
            label=f"{name}: 1 / (1 + (S / {fit['s50']:.2f})^{fit['k']:.2f})",
        )
        for value in thresholds(fit["s50"], fit["k"]).values():
            ax.axvline(value, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel(
        f"S = ftt-inspect {statistics_key()} (whole model); dashed: the verdict's thresholds"
    )
    ax.set_ylabel("transfer efficiency")
    ax.axhline(0, color="grey", lw=0.5)
    ax.axhline(1, color="grey", lw=0.5, ls=":")
    ax.legend()
    ax.set_title("Miniature Table 3: every ordered pair Mi + Δj")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(summary: dict, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": folder / "matrix.md", "json": folder / "matrix.json"}
    paths["markdown"].write_text(markdown(summary), encoding="utf-8")
    document = {
        **summary,
        "correlations": across_seeds(summary["seeds"]),
        **calibration_sections(summary),
    }
    paths["json"].write_text(json.dumps(document, indent=1, ensure_ascii=False), encoding="utf-8")
    paths["png"] = plot(summary, folder / "matrix.png")
    return paths
