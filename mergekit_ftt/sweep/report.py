"""Score against α: Markdown tables, CSV, a PNG of curves, the best α and the best recipe.

Scores are read from the sweep's result folders with the eval report's own reader
(:func:`mergekit_ftt.eval.report.build_table`), in percent, per suite column. A module
kind's curve takes its α = 1 point from ``all@1`` (the same model).

The best α of a curve is the one with the highest score; ties go to the α closest to 1
(the recipe as written), then to the smaller α. The best variant of the whole sweep is
the one with the highest mean over the columns, ties to ``all`` and then as above.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mergekit_ftt.eval.report import build_table
from mergekit_ftt.sweep.grid import ALL, Variant, format_alpha


@dataclass(frozen=True)
class Point:
    kind: str
    alpha: float
    source: str  # the variant whose results these are: a kind's α = 1 is all@1
    scores: dict[str, float]  # column name -> percent

    @property
    def mean(self) -> float | None:
        return sum(self.scores.values()) / len(self.scores) if self.scores else None


@dataclass
class SweepResults:
    columns: list[str]
    curves: dict[str, list[Point]]  # kind -> points in α order

    def best_alpha(self, kind: str, column: str | None = None) -> float | None:
        """The best α of one curve, for ``column`` or (None) the mean over columns."""
        scored = [
            (value, p.alpha)
            for p in self.curves[kind]
            if (value := p.mean if column is None else p.scores.get(column)) is not None
        ]
        if not scored:
            return None
        return max(scored, key=lambda item: (item[0], -abs(item[1] - 1), -item[1]))[1]

    def best_point(self) -> Point | None:
        """The variant with the highest mean score over the whole sweep."""
        points = [p for kind in self.curves for p in self.curves[kind] if p.mean is not None]
        if not points:
            return None
        return max(
            points,
            key=lambda p: (p.mean, p.kind == ALL, -abs(p.alpha - 1), -p.alpha),
        )


def collect(eval_dir: Path, variants: Sequence[Variant]) -> SweepResults:
    """The scores of every variant that has results under ``eval_dir``."""
    folders = [eval_dir / v.label for v in variants if any((eval_dir / v.label).glob("results_*"))]
    table = build_table(folders) if folders else None
    scores = {row.label: row.scores for row in table.rows} if table else {}
    by_key = {(v.kind, v.alpha): v for v in variants}
    curves: dict[str, list[Point]] = {}
    for variant in variants:
        curves.setdefault(variant.kind, [])
    for kind, points in curves.items():
        for alpha in sorted({v.alpha for v in variants if v.kind in (kind, ALL)}):
            source = (by_key.get((kind, alpha)) or by_key[ALL, alpha]).label
            if source in scores:
                points.append(Point(kind, alpha, source, scores[source]))
    return SweepResults(columns=table.columns if table else [], curves=curves)


def _title(kind: str) -> str:
    if kind == ALL:
        return "α on all tensors"
    return f"α on {kind} tensors (the other tensors at α = 1)"


def to_markdown(results: SweepResults) -> str:
    """One table per curve: α down, columns across (scores in %, the best bold), best α."""
    mean = len(results.columns) > 1
    headers = [*results.columns, *(["mean"] if mean else [])]
    parts = []
    for kind, points in results.curves.items():
        if not points:
            continue
        best = {c: results.best_alpha(kind, c) for c in results.columns}
        best["mean"] = results.best_alpha(kind)
        lines = [
            f"### {_title(kind)}",
            "",
            "| α | " + " | ".join(headers) + " |",
            "|---:|" + "---:|" * len(headers),
        ]
        for point in points:
            values = {**point.scores, **({"mean": point.mean} if mean else {})}
            cells = []
            for header in headers:
                value = values.get(header)
                text = "–" if value is None else f"{value:.1f}"
                cells.append(f"**{text}**" if best[header] == point.alpha else text)
            lines.append(f"| {format_alpha(point.alpha)} | " + " | ".join(cells) + " |")
        lines.append(
            "| best α | "
            + " | ".join("–" if best[h] is None else format_alpha(best[h]) for h in headers)
            + " |"
        )
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_csv(results: SweepResults, path: Path) -> None:
    """One line per (curve, α): scores in % with one decimal, and their mean."""
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["kind", "alpha", "variant", *results.columns, "mean"])
        for kind, points in results.curves.items():
            for point in points:
                values = [point.scores.get(c) for c in results.columns] + [point.mean]
                writer.writerow(
                    [
                        kind,
                        format_alpha(point.alpha),
                        point.source,
                        *("" if v is None else f"{v:.1f}" for v in values),
                    ]
                )


def plot(results: SweepResults, path: Path, title: str | None = None) -> None:
    """One panel per curve (all tensors, then each module kind): score against α, one
    line per column (and their mean, dashed), α = 1 marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    kinds = [kind for kind, points in results.curves.items() if points]
    fig, axes = plt.subplots(
        1, len(kinds), figsize=(4.2 * len(kinds) + 1.5, 4.0), sharey=True, squeeze=False
    )
    for ax, kind in zip(axes[0], kinds, strict=True):
        points = results.curves[kind]
        alphas = [p.alpha for p in points]
        for column in results.columns:
            ax.plot(alphas, [p.scores.get(column) for p in points], marker="o", label=column)
        if len(results.columns) > 1:
            ax.plot(alphas, [p.mean for p in points], "k--", marker=".", label="mean")
        ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.set_title(_title(kind).replace(" (the other", "\n(the other"), fontsize=9)
        ax.set_xlabel("α")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score (%)")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(results: SweepResults) -> dict:
    """The machine-readable report: every point, the best α per curve and column."""
    return {
        "columns": results.columns,
        "curves": {
            kind: [
                {
                    "alpha": p.alpha,
                    "variant": p.source,
                    "scores": p.scores,
                    "mean": p.mean,
                }
                for p in points
            ]
            for kind, points in results.curves.items()
        },
        "best_alpha": {
            kind: {
                **{c: results.best_alpha(kind, c) for c in results.columns},
                "mean": results.best_alpha(kind),
            }
            for kind in results.curves
        },
    }


def write_report(
    results: SweepResults, out_dir: Path, recipes_dir: Path, title: str | None = None
) -> dict[str, Path]:
    """report.md, report.csv, report.png, report.json in ``out_dir``, and the best
    variant's recipe as ``best_recipe.yml`` beside them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out_dir / "report.md",
        "csv": out_dir / "report.csv",
        "png": out_dir / "report.png",
        "json": out_dir / "report.json",
    }
    data = summary(results)
    best = results.best_point()
    text = to_markdown(results)
    if best is not None:
        paths["recipe"] = out_dir / "best_recipe.yml"
        shutil.copyfile(recipes_dir / f"{best.source}.yml", paths["recipe"])
        data["best"] = {"variant": best.source, "mean": best.mean, "recipe": str(paths["recipe"])}
        text += (
            f"\nBest variant: **{best.source}** (mean {best.mean:.1f}); its recipe: "
            f"`mergekit-yaml {paths['recipe']} OUTPUT`\n"
        )
    paths["markdown"].write_text(text, encoding="utf-8")
    write_csv(results, paths["csv"])
    paths["json"].write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    plot(results, paths["png"], title)
    return paths
