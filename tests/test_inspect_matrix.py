"""``ftt-demo --matrix``: the miniature Table 3 that calibrates ftt-inspect's verdict."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from mergekit_ftt.demo import calibration, matrix
from mergekit_ftt.demo.config import load_config
from mergekit_ftt.errors import FttError


def test_checkpoints_spread_over_both_stages():
    full = matrix.checkpoints_of(load_config("full"), "full")
    assert [(c.name, c.stage, c.step) for c in full] == [
        ("M1", 1, 300),
        ("M2", 1, 450),
        ("M3", 1, 600),
        ("M4", 2, 200),
        ("M5", 2, 400),
    ]
    quick = matrix.checkpoints_of(load_config("quick"), "quick")
    assert [(c.stage, c.step) for c in quick] == [(1, 300), (2, 100), (2, 200)]


def test_test_set_asks_about_taught_held_out_and_late_facts(tmp_path):
    config = load_config("quick")
    layout = matrix.SeedLayout(tmp_path)
    world = matrix.write_data(layout, config, seed=0)

    def questions(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [(row["messages"][0]["content"], row["messages"][1]["content"]) for row in rows]

    def operands(question):
        return tuple(int(word.strip("?")) for word in question.split() if word.strip("?").isdigit())

    part = config.task.test_examples // 3
    held_out = {(f.a, f.b) for f in world.early[:part]}
    late = {(f.a, f.b) for f in world.late}
    sft_facts = {operands(q) for q, _ in questions(layout.data / "sft.jsonl")}
    assert not sft_facts & held_out and not sft_facts & late

    test = questions(layout.data / "test.jsonl")
    facts = [operands(q) for q, _ in test]
    assert all(a + b == int(answer) for (a, b), (_, answer) in zip(facts, test, strict=True))
    assert len(test) == 2 * 5 * part  # (2 + 1 + 2) parts of facts, two templates each
    assert sum(f in held_out for f in facts) == 2 * part
    assert sum(f in late for f in facts) == 4 * part
    assert sum(f in sft_facts for f in facts) == 4 * part
    assert len(set(test)) == len(test)


def test_a_matrix_folder_is_resumed_only_with_the_same_settings(tmp_path):
    root = tmp_path / "matrix-quick"
    matrix.prepare(root, {"preset": "quick"}, overwrite=False)
    (root / "seed0").mkdir()
    matrix.prepare(root, {"preset": "quick"}, overwrite=False)  # resumes
    assert (root / "seed0").is_dir()
    with pytest.raises(FttError, match="other settings; pass --overwrite"):
        matrix.prepare(root, {"preset": "full"}, overwrite=False)
    matrix.prepare(root, {"preset": "full"}, overwrite=True)
    assert not (root / "seed0").exists()

    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("mine")
    with pytest.raises(FttError, match="holds no matrix run"):
        matrix.prepare(other, {"preset": "quick"}, overwrite=False)
    assert (other / "mine.txt").read_text() == "mine"


def test_fit_recovers_a_known_curve():
    points = [(s, 1 / (1 + (s / 1.5) ** 4)) for s in (0.3, 0.6, 1.0, 1.4, 2.0, 3.0, 5.0)]
    fit = calibration.fit_curve(points)
    assert fit["s50"] == pytest.approx(1.5, rel=0.01)
    assert fit["k"] == pytest.approx(4.0, abs=0.05)
    assert fit["rms_error"] < 1e-3


@pytest.mark.slow
def test_quick_matrix_runs_every_transfer_and_reports_correlations(tmp_path):
    command = shutil.which("ftt-demo")
    argv = [command] if command else [sys.executable, "-m", "mergekit_ftt.demo"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*argv, "--matrix", "1", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    root = tmp_path / "matrix-quick"
    for path in ("report/matrix.md", "report/matrix.json", "report/matrix.png"):
        assert (root / path).is_file(), path
    recipe = (root / "seed0/transfer/recipes/M3_plus_delta_M2.yml").read_text()
    assert "merge_method: finetuning_transfer" in recipe
    assert "### Spearman ρ" in result.stdout and "| M3 |" in result.stdout

    summary = json.loads((root / "report/matrix.json").read_text())
    (seed,) = summary["seeds"]
    pairs = {row["label"]: row for row in seed["pairs"]}
    assert sorted(pairs) == ["M1 + Δ2", "M1 + Δ3", "M2 + Δ1", "M2 + Δ3", "M3 + Δ1", "M3 + Δ2"]
    scores = seed["scores"]
    assert scores["M1"] == scores["M2"] == scores["M3"] == 0.0  # bases never saw a chat turn
    assert scores["FT(M3)"] > 0
    # The two stage-2 checkpoints lie closer to each other than to the end of stage 1, and
    # their transfers do better, as in the paper's Table 3.
    gap = {label: row["candidates"]["model.gap_to_delta"] for label, row in pairs.items()}
    assert gap["M3 + Δ2"] < gap["M3 + Δ1"] and gap["M2 + Δ3"] < gap["M2 + Δ1"]
    assert pairs["M3 + Δ2"]["score"] > pairs["M3 + Δ1"]["score"]
    assert pairs["M3 + Δ2"]["verdict"]["score"] > pairs["M3 + Δ1"]["verdict"]["score"]
    assert "model.gap_to_delta" in {entry["statistic"] for entry in summary["correlations"]}


def test_verbose_keeps_the_libraries_output_on_the_terminal(tmp_path, capsys):
    """``ftt-demo --matrix --verbose``: what the libraries print is not sent to matrix.log."""
    log = tmp_path / matrix.LOG_FILE
    with matrix.quiet(log):
        print("loss 1.0 (into the log)")
    with matrix.quiet(None):  # --verbose
        print("loss 0.5 (on the terminal)")
    assert capsys.readouterr().out == "loss 0.5 (on the terminal)\n"
    assert "loss 1.0 (into the log)" in log.read_text()


def test_matrix_takes_verbose(tmp_path):
    """--verbose is passed on, not refused: the run gets as far as its output check."""
    (tmp_path / "matrix-quick").mkdir()
    (tmp_path / "matrix-quick" / "notes.txt").write_text("mine")
    flags = ["--matrix", "1", "--quick", "--verbose", "--out", str(tmp_path)]
    run = subprocess.run(
        [sys.executable, "-m", "mergekit_ftt.demo", *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines()[-1] == (
        f"ftt-demo: error: {tmp_path / 'matrix-quick'} is not empty and holds no matrix run; "
        "choose another --out"
    )
    assert "Traceback" not in run.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["matrix-quick", "notes.txt"]
