"""The report from stored result files in lm-eval's layout (no model runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergekit_ftt.errors import FttError
from mergekit_ftt.eval.report import build_table, to_markdown, write_report

REPO = Path(__file__).resolve().parents[1]
COLUMNS = [
    {"task": "gsm8k_llama", "name": "GSM8K", "metrics": ["exact_match,strict_match"]},
    {
        "task": "ifeval",
        "name": "IFEval",
        "metrics": ["prompt_level_strict_acc,none", "prompt_level_loose_acc,none"],
    },
]


def write_model(
    root: Path,
    label: str,
    gsm8k: float,
    strict: float,
    loose: float,
    base: str | None = None,
    date: str = "2026-01-01T00-00-00.000000",
) -> Path:
    folder = root / label
    folder.mkdir(parents=True, exist_ok=True)
    results = {
        "results": {
            "gsm8k_llama": {
                "alias": "gsm8k_llama",
                "exact_match,strict_match": gsm8k,
                "exact_match_stderr,strict_match": 0.01,
            },
            "ifeval": {
                "alias": "ifeval",
                "prompt_level_strict_acc,none": strict,
                "prompt_level_loose_acc,none": loose,
            },
        },
        "group_subtasks": {"gsm8k_llama": [], "ifeval": []},
        "config": {"limit": None},
    }
    (folder / f"results_{date}.json").write_text(json.dumps(results), encoding="utf-8")
    record = {
        "model": {"label": label, "pretrained": f"/models/{label}", "base": base},
        "columns": COLUMNS,
    }
    (folder / "ftt_run.json").write_text(json.dumps(record), encoding="utf-8")
    return folder


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    write_model(root, "Llama 3.0", 0.10, 0.30, 0.40)  # superseded by the newer file below
    write_model(root, "Llama 3.0", 0.556, 0.30, 0.35, date="2026-02-01T00-00-00.000000")
    write_model(root, "Llama 3.0 + Δ3.1", 0.828, 0.74, 0.792, base="Llama 3.0")
    write_model(root, "Llama 3.1 Instruct", 0.865, 0.78, 0.83)
    return root


EXPECTED_MD = """\
| Model | GSM8K | IFEval |
|---|---:|---:|
| Llama 3.0 | 55.6 | 32.5 |
| Llama 3.0 + Δ3.1 | 82.8 (+27.2) | 76.6 (+44.1) |
| Llama 3.1 Instruct | **86.5** | **80.5** |
"""

EXPECTED_CSV = """\
model,base,GSM8K,IFEval,GSM8K gain,IFEval gain
Llama 3.0,,55.6,32.5,,
Llama 3.0 + Δ3.1,Llama 3.0,82.8,76.6,27.2,44.1
Llama 3.1 Instruct,,86.5,80.5,,
"""


def test_table_cells_best_and_gains(results_dir: Path, tmp_path: Path):
    table = build_table([results_dir])
    assert to_markdown(table) == EXPECTED_MD
    paths = write_report(table, tmp_path / "report", title="Table 1")
    assert paths["csv"].read_text(encoding="utf-8") == EXPECTED_CSV
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_report_on_plain_lm_eval_folders_with_base_flag(tmp_path: Path):
    """Folders without ftt_run.json: labelled by folder, first metric per task, --base on the command line."""
    root = tmp_path / "plain"
    for label, value in (("base", 0.5), ("merged", 0.75)):
        folder = root / label
        folder.mkdir(parents=True)
        results = {
            "results": {
                "tiny": {"alias": "tiny", "exact_match,none": value, "exact_match_stderr,none": 0.1}
            }
        }
        (folder / "results_2026-01-01T00-00-00.json").write_text(
            json.dumps(results), encoding="utf-8"
        )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mergekit_ftt.eval.cli",
            "report",
            str(root / "base"),
            str(root / "merged"),
            "--base",
            "merged=base",
            "--out",
            str(tmp_path / "out"),
        ],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    assert "| merged | **75.0** (+25.0) |" in done.stdout
    assert (tmp_path / "out" / "report.png").is_file()


def test_unknown_base_is_a_clear_error(results_dir: Path):
    with pytest.raises(FttError, match="declares base 'Llama 2', which has no results"):
        build_table([results_dir], bases={"Llama 3.0 + Δ3.1": "Llama 2"})


def test_missing_metric_names_what_exists(tmp_path: Path):
    folder = write_model(tmp_path, "m", 0.5, 0.5, 0.5)
    record = json.loads((folder / "ftt_run.json").read_text(encoding="utf-8"))
    record["columns"][0]["metrics"] = ["exact_match,flexible-extract"]
    (folder / "ftt_run.json").write_text(json.dumps(record), encoding="utf-8")
    with pytest.raises(
        FttError, match="no metric exact_match,flexible-extract; it has exact_match,strict_match"
    ):
        build_table([tmp_path])
