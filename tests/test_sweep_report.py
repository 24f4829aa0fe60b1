"""The sweep report on planted results: two tasks, their mean, ties, the best recipe."""

from __future__ import annotations

import json
from pathlib import Path

from mergekit_ftt.sweep.grid import Variant
from mergekit_ftt.sweep.report import collect, to_markdown, write_report

# accuracy per variant and task; means: all@0 0.5, all@1 0.5 (a tie), mlp@0 0.7.
PLANTED = {
    "all@0": {"t1": 0.2, "t2": 0.8},
    "all@1": {"t1": 0.6, "t2": 0.4},
    "mlp@0": {"t1": 0.9, "t2": 0.5},
}
VARIANTS = [Variant("all", 0.0, None), Variant("all", 1.0, None), Variant("mlp", 0.0, None)]


def plant(root: Path) -> tuple[Path, Path]:
    eval_dir, recipes = root / "eval", root / "recipes"
    recipes.mkdir(parents=True)
    for label, scores in PLANTED.items():
        folder = eval_dir / label
        folder.mkdir(parents=True)
        results = {"results": {task: {"acc,none": value} for task, value in scores.items()}}
        (folder / "results_2026-01-01T00-00-00.json").write_text(json.dumps(results))
        (recipes / f"{label}.yml").write_text(f"# recipe of {label}\n")
    return eval_dir, recipes


def test_best_alpha_per_task_on_average_and_overall(tmp_path):
    eval_dir, recipes = plant(tmp_path)
    results = collect(eval_dir, VARIANTS)
    assert results.columns == ["t1", "t2"]
    assert [p.source for p in results.curves["mlp"]] == ["mlp@0", "all@1"]  # α = 1 shared
    assert results.best_alpha("all", "t1") == 1.0
    assert results.best_alpha("all", "t2") == 0.0
    assert results.best_alpha("all") == 1.0  # mean tie: the α closest to 1
    assert results.best_alpha("mlp", "t1") == results.best_alpha("mlp") == 0.0
    assert results.best_point().source == "mlp@0"
    text = to_markdown(results)
    assert "| α | t1 | t2 | mean |" in text
    assert "| 1 | **60.0** | 40.0 | **50.0** |" in text
    assert "| best α | 1 | 0 | 1 |" in text
    paths = write_report(results, tmp_path / "report", recipes)
    assert paths["recipe"].read_text() == "# recipe of mlp@0\n"
    lines = paths["csv"].read_text().splitlines()
    assert lines == [
        "kind,alpha,variant,t1,t2,mean",
        "all,0,all@0,20.0,80.0,50.0",
        "all,1,all@1,60.0,40.0,50.0",
        "mlp,0,mlp@0,90.0,50.0,70.0",
        "mlp,1,all@1,60.0,40.0,50.0",
    ]
    summary = json.loads(paths["json"].read_text())
    assert summary["best"]["variant"] == "mlp@0"
    assert summary["best_alpha"]["all"] == {"t1": 1.0, "t2": 0.0, "mean": 1.0}
