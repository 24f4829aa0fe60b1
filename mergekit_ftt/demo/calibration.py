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
from pathlib import Path

from mergekit_ftt.inspect.verdict import (
    LIKELY,
    UNLIKELY,
    predicted_efficiency,
    statistics_key,
    thresholds,
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


def _points(seeds: Sequence[dict]) -> list[tuple[float, float]]:
    return [
        (row["candidates"][f"model.{statistics_key()}"], row["efficiency"])
        for seed in seeds
        for row in seed["pairs"]
        if row["efficiency"] is not None and row["candidates"].get(f"model.{statistics_key()}")
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


def markdown(summary: dict) -> str:
    seeds = summary["seeds"]
    table = across_seeds(seeds)
    load = summary["load_average"]
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
        "### Calibration of the verdict",
        "",
        calibration_text(calibrate(seeds)),
        "",
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
    if points:
        fit = fit_curve(points)
        low, high = min(x for x, _ in points) * 0.8, max(x for x, _ in points) * 1.2
        xs = [low * (high / low) ** (i / 100) for i in range(101)]
        ax.plot(
            xs,
            [predicted_efficiency(x, fit["s50"], fit["k"]) for x in xs],
            color="black",
            lw=1,
            label=f"fit: 1 / (1 + (S / {fit['s50']:.2f})^{fit['k']:.2f})",
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
        "calibration": calibrate(summary["seeds"]),
    }
    paths["json"].write_text(json.dumps(document, indent=1, ensure_ascii=False), encoding="utf-8")
    paths["png"] = plot(summary, folder / "matrix.png")
    return paths
