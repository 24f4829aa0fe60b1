"""``ftt-demo``: the whole pipeline (pre-training, ftt-train, mergekit-yaml, lm-eval) for real."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from mergekit_ftt.demo.cli import LOG_FILE, mark_finished, prepare_output
from mergekit_ftt.demo.config import load_config
from mergekit_ftt.demo.corpus import TaskConfig, World, held_out_examples, sft_examples
from mergekit_ftt.errors import FttError


def run_demo(*args: str) -> subprocess.CompletedProcess:
    """ftt-demo as a user runs it; the output as bytes decoded, so that a bar's "\r"
    updates stay on their line as in a terminal (text mode would make each a line)."""
    command = shutil.which("ftt-demo")
    argv = [command] if command else [sys.executable, "-m", "mergekit_ftt.demo"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([*argv, *args], capture_output=True, env=env, timeout=600, check=False)
    run.stdout, run.stderr = run.stdout.decode(), run.stderr.decode()
    return run


@pytest.mark.slow
def test_quick_demo_transfers_the_finetuning_to_the_later_checkpoint(tmp_path):
    out = tmp_path / "demo"
    result = run_demo("--quick", "--out", str(out), "--seed", "0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    for path in (
        "transfer/transfer.yml",
        "transfer/transferred/config.json",
        "configs/FT_M_a.yaml",
        "report/report.md",
        "report/report.csv",
        "report/report.png",
        "report/results.json",
    ):
        assert (out / path).is_file(), path
    recipe = (out / "transfer/transfer.yml").read_text()
    assert "merge_method: finetuning_transfer" in recipe

    scores = json.loads((out / "report/results.json").read_text())
    accuracy = {label: next(iter(row["scores"].values())) for label, row in scores.items()}
    # Bases have never seen a chat turn; the transferred delta gives M_b the chat skill.
    assert accuracy["M_a"] == accuracy["M_b"] == 0.0
    assert accuracy["M_b + Δ_a"] >= accuracy["M_b"] + 10
    assert accuracy["FT(M_b)"] > accuracy["M_b"]
    assert scores["M_b + Δ_a"]["base"] == "M_b"
    assert "| M_b + Δ_a |" in result.stdout  # the table is printed
    # Stage lines, one bar per long stage and the table; the libraries' output is in the log.
    printed = result.stdout + result.stderr
    assert printed.count("\n") <= 30, printed
    assert "Traceback" not in printed and "'loss'" not in printed and "INFO" not in printed
    lines = printed.split("\n")  # a bar's updates share its line ("\r")
    assert sum(line.startswith("[ftt-demo") for line in lines) == 7
    assert sum("100%|" in line for line in lines) == 4  # pre-training, 2 fine-tunings, eval
    assert "'loss'" in (out / LOG_FILE).read_text()  # TRL's loss lines

    # A finished run is not overwritten without --overwrite.
    again = run_demo("--quick", "--out", str(out))
    assert again.returncode == 2
    assert "holds a finished demo run; pass --overwrite" in again.stderr


def test_output_folder_that_is_not_a_demo_run_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FttError, match="not empty and holds no demo run"):
        prepare_output(tmp_path, {"preset": "quick", "seed": 0}, ["main"], overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_unfinished_run_with_other_settings_is_not_resumed(tmp_path):
    prepare_output(tmp_path, {"preset": "quick", "seed": 0}, ["main"], overwrite=False)
    with pytest.raises(FttError, match="other settings"):
        prepare_output(tmp_path, {"preset": "quick", "seed": 1}, ["main"], overwrite=False)


def test_unfinished_run_resumes_and_a_finished_one_is_replaced_only_with_overwrite(tmp_path):
    settings = {"preset": "quick", "seed": 0}
    prepare_output(tmp_path, settings, ["main"], overwrite=False)
    (tmp_path / "models").mkdir()
    prepare_output(tmp_path, settings, ["main"], overwrite=False)  # resumes: keeps the stages
    assert (tmp_path / "models").is_dir()
    mark_finished(tmp_path, "main")
    prepare_output(tmp_path, settings, ["main", "finetune_after"], overwrite=False)
    assert (tmp_path / "models").is_dir()  # a new part on a finished run reuses its stages
    with pytest.raises(FttError, match="finished demo run"):
        prepare_output(tmp_path, settings, ["main"], overwrite=False)
    prepare_output(tmp_path, settings, ["main"], overwrite=True)
    assert not (tmp_path / "models").exists()


def test_test_questions_ask_only_about_facts_told_in_stage_two():
    config = load_config("full").task
    world = World.build(config, seed=3)
    late = {(f.a, f.b) for f in world.late}
    assert not late & {(f.a, f.b) for f in world.early}
    for example in held_out_examples(world, config.test_examples, seed=3):
        question, answer = (m["content"] for m in example["messages"])
        a, b = (int(word.rstrip("?")) for word in question.split() if word.rstrip("?").isdigit())
        assert (a, b) in late and int(answer) == a + b
    for example in sft_examples(world, config.sft_examples, seed=3):
        question = example["messages"][0]["content"]
        a, b = (int(word.rstrip("?")) for word in question.split() if word.rstrip("?").isdigit())
        assert (a, b) not in late


def test_too_few_late_facts_for_the_test_set_is_a_clear_error():
    with pytest.raises(ValueError, match="raise max_operand or late_fraction"):
        World.build(
            TaskConfig(max_operand=3, late_fraction=0.1, sft_examples=10, test_examples=50), seed=0
        )
