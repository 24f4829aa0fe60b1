"""The paper-shaped comparison table from result folders: Markdown, CSV and a bar chart.

Rows are models, columns are a suite's tasks, scores in percent with one decimal. The
best score of each column is bold. A row that declares a target base (``ModelSpec.base``,
stored in ``ftt_run.json``, or ``--base LABEL=BASE`` here) is a "+ Δ" row: its cells also
show the gain over that base, e.g. ``82.8 (+27.2)``.

Any lm-eval output folder works: a folder without ``ftt_run.json`` is labelled by its
name and gets one column per task, scored by the task's first reported metric.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mergekit_ftt.errors import FttError
from mergekit_ftt.eval.runner import RUN_FILE
from mergekit_ftt.eval.suites import Column


@dataclass
class Row:
    label: str
    base: str | None
    scores: dict[str, float] = field(default_factory=dict)  # column name -> percent


@dataclass
class Table:
    columns: list[str]
    rows: list[Row]

    def row(self, label: str) -> Row:
        return next(r for r in self.rows if r.label == label)

    def score(self, row: Row, column: str) -> float | None:
        value = row.scores.get(column)
        return None if value is None else round(value, 1)

    def gain(self, row: Row, column: str) -> float | None:
        """Displayed score minus the displayed score of the row's base."""
        if row.base is None:
            return None
        mine, theirs = self.score(row, column), self.score(self.row(row.base), column)
        return None if mine is None or theirs is None else round(mine - theirs, 1)

    def best(self, column: str) -> float | None:
        values = [v for r in self.rows if (v := self.score(r, column)) is not None]
        return max(values, default=None)


def _model_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """The folders holding results_*.json: the paths themselves or their children."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise FttError(f"no result folder {path}")
        candidates = [path] if any(path.glob("results_*.json")) else sorted(path.iterdir())
        found += [c for c in candidates if c.is_dir() and any(c.glob("results_*.json"))]
    if not found:
        raise FttError(f"no results_*.json in {', '.join(map(str, paths))} or their subfolders")
    return found


def _newest_results(model_dir: Path) -> dict[str, dict]:
    """Task/group name -> its metrics, from the newest results file that holds it."""
    by_task: dict[str, dict] = {}
    for path in sorted(model_dir.glob("results_*.json")):  # dated names: oldest first
        by_task.update(json.loads(path.read_text(encoding="utf-8"))["results"])
    return by_task


def _first_metric(metrics: Mapping[str, object]) -> tuple[str, ...]:
    for key, value in metrics.items():
        if "," in key and "_stderr," not in key and isinstance(value, int | float):
            return (key,)
    raise FttError(f"no metric among {list(metrics)}")


def _score(model_dir: Path, column: Column, metrics: Mapping[str, object]) -> float:
    keys = column.metrics or _first_metric(metrics)
    missing = [k for k in keys if not isinstance(metrics.get(k), int | float)]
    if missing:
        raise FttError(
            f"{model_dir}: task {column.task} has no metric {', '.join(missing)}; "
            f"it has {', '.join(k for k in metrics if ',' in k)}"
        )
    return 100 * sum(float(metrics[k]) for k in keys) / len(keys)


def _read_model(model_dir: Path) -> tuple[Row, list[Column]]:
    results = _newest_results(model_dir)
    record_path = model_dir / RUN_FILE
    if record_path.exists():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        label, base = record["model"]["label"], record["model"].get("base")
        columns = [
            Column(c["task"], c["name"], tuple(c.get("metrics", ()))) for c in record["columns"]
        ]
    else:
        label, base = model_dir.name, None
        columns = [Column(task, task) for task in results]
    row = Row(label=label, base=base)
    for column in columns:
        if column.task in results:
            row.scores[column.name] = _score(model_dir, column, results[column.task])
    return row, columns


def build_table(result_dirs: Sequence[str | Path], bases: Mapping[str, str] | None = None) -> Table:
    """Read every model folder under ``result_dirs``; ``bases`` maps a row label to its base."""
    rows: list[Row] = []
    column_names: list[str] = []
    for model_dir in _model_dirs(result_dirs):
        row, columns = _read_model(model_dir)
        if any(r.label == row.label for r in rows):
            raise FttError(f"two result folders are labelled {row.label!r}")
        rows.append(row)
        column_names += [
            c.name for c in columns if c.name not in column_names and c.name in row.scores
        ]
    for label, base in (bases or {}).items():
        _find(rows, label, "--base names an unknown row").base = base
    for row in rows:
        if row.base is not None:
            _find(
                rows,
                row.base,
                f"row {row.label!r} declares base {row.base!r}, which has no results;",
            )
    return Table(columns=column_names, rows=rows)


def _find(rows: list[Row], label: str, problem: str) -> Row:
    for row in rows:
        if row.label == label:
            return row
    raise FttError(f"{problem} {label!r}; rows are {', '.join(r.label for r in rows)}")


def _cell(table: Table, row: Row, column: str) -> str:
    score = table.score(row, column)
    if score is None:
        return "–"
    text = f"{score:.1f}"
    if score == table.best(column):
        text = f"**{text}**"
    gain = table.gain(row, column)
    return text if gain is None else f"{text} ({gain:+.1f})"


def to_markdown(table: Table) -> str:
    lines = [
        "| Model | " + " | ".join(table.columns) + " |",
        "|---|" + "---:|" * len(table.columns),
    ]
    for row in table.rows:
        cells = [_cell(table, row, c) for c in table.columns]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(table: Table, path: Path) -> None:
    """One line per model: scores, then the gain over the base (empty for base rows)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "base", *table.columns, *(f"{c} gain" for c in table.columns)])
        for row in table.rows:
            scores = [table.score(row, c) for c in table.columns]
            gains = [table.gain(row, c) for c in table.columns]
            writer.writerow(
                [
                    row.label,
                    row.base or "",
                    *("" if v is None else f"{v:.1f}" for v in scores + gains),
                ]
            )


def plot(table: Table, path: Path, title: str | None = None) -> None:
    """Grouped bars: one group per task, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    import numpy as np

    n_rows = len(table.rows)
    width = 0.8 / n_rows
    x = np.arange(len(table.columns))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(table.columns) + 2), 4.5))
    for i, row in enumerate(table.rows):
        values = [table.score(row, c) for c in table.columns]
        bars = ax.bar(
            x + (i - (n_rows - 1) / 2) * width,
            [np.nan if v is None else v for v in values],
            width,
            label=row.label,
            hatch="//" if row.base else None,  # "+ Δ" rows stand out
            edgecolor="white",
        )
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(x, table.columns)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(table: Table, out_dir: str | Path, title: str | None = None) -> dict[str, Path]:
    """Write report.md, report.csv and report.png into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out_dir / "report.md",
        "csv": out_dir / "report.csv",
        "png": out_dir / "report.png",
    }
    paths["markdown"].write_text(to_markdown(table), encoding="utf-8")
    write_csv(table, paths["csv"])
    plot(table, paths["png"], title)
    return paths
