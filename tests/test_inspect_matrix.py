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


def run_demo(*arguments: str) -> subprocess.CompletedProcess:
    """``ftt-demo ARGUMENTS`` in a fresh process, offline, on one thread; asserts it succeeded."""
    command = shutil.which("ftt-demo")
    argv = [command] if command else [sys.executable, "-m", "mergekit_ftt.demo"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*argv, *arguments], capture_output=True, text=True, env=env, timeout=1200, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_quick_matrix_runs_every_transfer_and_reports_correlations(tmp_path):
    result = run_demo("--matrix", "1", "--quick", "--out", str(tmp_path))
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


def _seed(number: int, points, statistic: str = "model.gap_to_delta") -> dict:
    """A seed summary holding only what the held-out scoring reads."""
    return {
        "seed": number,
        "pairs": [{"efficiency": e, "candidates": {statistic: s}} for s, e in points],
    }


def _curve(s50: float, k: float):
    return [(s, 1 / (1 + (s / s50) ** k)) for s in (0.3, 0.5, 0.8, 1.0, 1.3, 2.0, 3.0, 4.5)]


def test_heldout_split_never_fits_on_a_heldout_seed():
    with pytest.raises(ValueError, match="both calibration and held-out"):
        calibration.SeedSplit((0, 1, 2), (2, 3))
    with pytest.raises(ValueError, match="at least one held-out"):
        calibration.SeedSplit((0, 1), ())
    split = calibration.SeedSplit((0, 1), (5, 6))
    # Seeds 5 and 6 follow another curve: if either entered the fit, it would move.
    seeds = [
        _seed(0, _curve(1.0, 2.0)),
        _seed(5, _curve(3.0, 5.0)),
        _seed(1, _curve(1.0, 2.0)),
        _seed(6, _curve(0.4, 1.0)),
    ]
    calibrating, heldout = split.parts(seeds)
    assert [s["seed"] for s in calibrating] == [0, 1]
    assert [s["seed"] for s in heldout] == [5, 6]
    report = calibration.heldout_report(calibrating, heldout, compared=["model.gap_to_delta"])
    (refit,) = report["refit"]
    assert refit["fit"]["s50"] == pytest.approx(1.0, rel=0.01)
    assert refit["fit"]["k"] == pytest.approx(2.0, abs=0.05)
    assert [row["seed"] for row in refit["per_seed"]] == [5, 6]
    assert all(row["rms_error"] > 0.05 for row in refit["per_seed"])  # truly out of sample
    assert refit["spread"]["seeds"] == 2 and refit["spread"]["rms_error"]["sd"] is not None
    assert [row["seed"] for row in report["shipped"]["per_seed"]] == [5, 6]
    with pytest.raises(ValueError, match="no measurements for seed"):
        calibration.SeedSplit((0,), (9,)).parts(seeds)


def test_heldout_seeds_exclude_those_the_shipped_calibration_saw():
    shipped = calibration.shipped_seeds("full")
    assert shipped == (0, 1, 2)  # verdict_calibration.json's runs
    assert calibration.shipped_seeds("llama") == ()
    calibration.check_heldout([("full", 0)], [("full", 3), ("llama", 0)])
    with pytest.raises(ValueError, match="full seed 1: used by the calibration"):
        calibration.check_heldout([], [("full", 1)])
    with pytest.raises(ValueError, match="llama seed 4: used by the calibration"):
        calibration.check_heldout([("llama", 4)], [("llama", 4), ("llama", 5)])
    seeds = [_seed(n, _curve(1.0, 2.0)) for n in (2, 3)]
    with pytest.raises(ValueError, match="full seed 2"):
        calibration.matrix_heldout(seeds, calibration.SeedSplit((3,), (2,)), "full")


def test_a_heldout_seed_the_shipped_file_was_fitted_on_is_refused_before_anything_runs(tmp_path):
    split = calibration.SeedSplit((), (2, 3))
    with pytest.raises(FttError, match="full seed 2: used by the calibration"):
        matrix.run(tmp_path / "out", "full", split.seeds, 1, False, split)
    assert not (tmp_path / "out").exists()


def test_levels_agree_when_the_measured_efficiency_falls_in_the_predicted_band():
    seed = _seed(0, [(0.2, 0.9), (0.2, 0.5), (1.0, 0.5), (5.0, 0.1), (5.0, 0.8)])
    seed["pairs"][0]["verdict"] = {"in_range": False}
    row = calibration.score_seed(seed, "model.gap_to_delta", s50=1.0, k=2.0)
    assert row["out_of_range"] == 1
    assert row["level_agreement"] == pytest.approx(3 / 5)
    assert [band["pairs"] for band in row["bands"].values()] == [2, 1, 2]
    assert row["spearman"] == pytest.approx(
        -calibration.spearman([0.2, 0.2, 1, 5, 5], [0.9, 0.5, 0.5, 0.1, 0.8])
    )


def test_a_heldout_seed_where_no_finetuning_gained_enough_gets_no_figures():
    empty = _seed(7, [(0.5, None), (2.0, None)])
    report = calibration.heldout_report([_seed(0, _curve(1.0, 2.0))], [empty])
    (row,) = report["shipped"]["per_seed"]
    assert row["pairs"] == 0 and row["rms_error"] is None and row["spearman"] is None
    assert report["shipped"]["spread"]["rms_error"] is None
    assert "| 7 | 0 (0) | – | – | – |" in calibration.heldout_text(report)


def test_seed_lists_and_the_demo_flags_that_take_them():
    from mergekit_ftt.demo import cli

    assert calibration.parse_seeds("0,1,2") == (0, 1, 2)
    assert calibration.parse_seeds("3-5") == (3, 4, 5)
    with pytest.raises(ValueError, match="listed twice"):
        calibration.parse_seeds("1,0-2")
    args = cli.build_parser().parse_args(
        ["--calibration-seeds", "0,1,2", "--heldout-seeds", "3-5", "--preset", "llama"]
    )
    cli._refuse_unused_with_matrix(args)
    seeds, split = cli.matrix_seeds(args)
    assert seeds == [0, 1, 2, 3, 4, 5] and split.heldout == (3, 4, 5)
    assert cli.preset_of(args) == "llama"
    overlapping = cli.build_parser().parse_args(
        ["--calibration-seeds", "0,1", "--heldout-seeds", "1"]
    )
    cli._refuse_unused_with_matrix(overlapping)
    with pytest.raises(FttError, match="both calibration and held-out"):
        cli.matrix_seeds(overlapping)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--heldout-seeds", "three"])
    counted = cli.build_parser().parse_args(["--matrix", "2", "--heldout-seeds", "3-5"])
    cli._refuse_unused_with_matrix(counted)
    with pytest.raises(FttError, match="--matrix 2 and the 3 calibration and held-out seeds"):
        cli.matrix_seeds(counted)
    for argv, message in (
        (["--quick", "--preset", "llama", "--matrix"], "give one of --quick and --preset llama"),
        (["--preset", "llama"], "a miniature for the matrix"),
    ):
        conflicting = cli.build_parser().parse_args(argv)
        cli._refuse_unused_with_matrix(conflicting)
        with pytest.raises(FttError, match=message):
            cli.preset_of(conflicting)
    alone = cli.build_parser().parse_args(["--calibration-seeds", "0"])
    cli._refuse_unused_with_matrix(alone)
    with pytest.raises(FttError, match="needs --heldout-seeds"):
        cli.matrix_seeds(alone)


def test_llama_preset_is_another_architecture_task_and_finetuning(tmp_path):
    olmo, llama = load_config("full"), load_config("llama")
    assert (llama.model.architecture, llama.model.num_kv_heads) == ("llama", 2)
    assert llama.model.tie_word_embeddings and not olmo.model.tie_word_embeddings
    assert llama.task.operation == "product" and olmo.task.operation == "sum"
    layout = matrix.SeedLayout(tmp_path)
    matrix.write_data(layout, llama, seed=0)
    rows = [json.loads(line) for line in (layout.data / "test.jsonl").read_text().splitlines()]
    for row in rows:
        question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        a, b = (int(word.strip("?")) for word in question.split() if word.strip("?").isdigit())
        assert "times" in question or "product" in question
        assert int(answer) == a * b
    settings = pipeline_settings(layout, llama)
    assert settings["learning_rate"] == 1.0e-3 and settings["max_steps"] == 100
    assert settings["assistant_only_loss"] is True  # the rest from sft.yaml


def pipeline_settings(layout, config) -> dict:
    import yaml

    from mergekit_ftt.demo import pipeline

    path = pipeline.write_trl_config(
        layout, config, "FT_M1", layout.model("M1"), layout.model("FT(M1)"), seed=0
    )
    return yaml.safe_load(path.read_text())


@pytest.mark.slow
def test_llama_quick_matrix_scores_the_shipped_verdict_on_heldout_seeds(tmp_path):
    result = run_demo("--preset", "llama-quick", "--heldout-seeds", "0", "--out", str(tmp_path))
    root = tmp_path / "matrix-llama-quick"
    config = json.loads((root / "seed0/models/M1/config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2
    assert config["tie_word_embeddings"] is True
    summary = json.loads((root / "report/matrix.json").read_text())
    assert summary["split"] == {"calibration": [], "heldout": [0]}
    assert summary["calibration"] is None  # nothing refitted: only the shipped curve scored
    (row,) = summary["heldout"]["shipped"]["per_seed"]
    assert row["seed"] == 0 and row["pairs"] > 0 and 0 <= row["level_agreement"] <= 1
    assert "### Held out: seeds the fit never saw" in result.stdout
    (seed,) = summary["seeds"]
    assert seed["scores"]["FT(M3)"] > seed["scores"]["M3"]
    pairs = {row["label"]: row for row in seed["pairs"]}
    gap = {label: pair["candidates"]["model.gap_to_delta"] for label, pair in pairs.items()}
    assert gap["M3 + Δ2"] < gap["M3 + Δ1"]  # the two stage-2 checkpoints lie closest
    assert row["out_of_range"] == sum(not pair["verdict"]["in_range"] for pair in seed["pairs"])


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
