"""User paths run as a user types them: what each prints, its exit status and what it leaves.

The bad inputs that end in one error line are in test_error_table.py (and docs/errors.md);
these are the paths that must work, or must say something on the way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import (
    CORPUS,
    OFFLINE_ENV,
    cpu_train_config,
    error_line,
    run_cli,
    transfer_recipe,
    write_tiny_task,
)

from mergekit_ftt.tiny import build_tokenizer, save_random_model, tiny_config


def test_negative_alphas_reach_the_sweep(tmp_path):
    """`--alphas -1,1` is a value, not an unknown option: the sweep goes on to its next
    check (here a missing --include-path folder), and leaves no --out behind."""
    run = run_cli(
        "ftt-sweep", "recipe.yml", "--alphas", "-1,1", "--tasks", "t",
        "--include-path", "nowhere", "--out", "sweep", cwd=tmp_path,
    )  # fmt: skip
    assert "no folder nowhere" in error_line(run, "ftt-sweep")
    assert list(tmp_path.iterdir()) == []


def test_console_scripts_are_found_beside_the_interpreter(tmp_path):
    """A venv's command run by its full path, the venv not on PATH, finds its siblings
    (ftt-demo --matrix runs mergekit-multi, ftt-iterate mergekit-yaml)."""
    env = {**OFFLINE_ENV, "PATH": "/usr/bin:/bin"}
    code = "from mergekit_ftt.cli import installed_command as c; print(c('mergekit-multi'))"
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(Path(sys.executable).parent / "mergekit-multi")


@pytest.mark.slow
def test_delta_config_is_covered_and_old_deltas_stay_readable(llama, tmp_path):
    delta = tmp_path / "delta"
    run = run_cli(
        "ftt-delta", "extract", "--finetuned", str(llama.model("ft_a", 3)),
        "--base", str(llama.model("source_base", 2)), str(delta),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "  tensors: 100%" in run.stdout  # the bar reaches the terminal, not the log
    info = run_cli("ftt-delta", "info", str(delta))
    assert "integrity    sha256 of every file; of delta_config.json: " in info.stdout
    # A delta extracted before the config hash existed: readable, and said to be uncovered.
    config = json.loads((delta / "delta_config.json").read_text())
    del config["config_sha256"]
    (delta / "delta_config.json").write_text(json.dumps(config))
    info = run_cli("ftt-delta", "info", "--verify", str(delta))
    assert info.returncode == 0, info.stderr
    assert "of delta_config.json: not recorded (extracted by an older" in info.stdout


def padded_model(folder: Path, seed: int, tokenizer, rows: int) -> Path:
    """A tiny OLMo 2 whose embedding has ``rows`` rows for fewer tokens (OLMo 2's padding)."""
    config = tiny_config(
        "olmo2",
        vocab_size=rows,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return save_random_model(config, folder, seed=seed, tokenizer=tokenizer)


def rows_of(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["vocab_size"]


@pytest.mark.slow
def test_padded_rows_survive_two_iterate_rounds(tmp_path):
    """OLMo 2 pads its embedding rows; two `ftt-iterate` rounds keep them: each transfer
    has the fine-tuned model's rows, so the second round's delta matches its target."""
    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    rows = -(-len(tokenizer) // 64) * 64 + 64  # padding rows past the tokenizer
    base, target, later = (
        padded_model(tmp_path / name, seed, tokenizer, rows)
        for name, seed in (("base", 0), ("target", 1), ("later", 2))
    )
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": text[:40]},
                                     {"role": "assistant", "content": text[40:80]}]}) + "\n"
            for text in CORPUS
        )
    )  # fmt: skip
    config = cpu_train_config(
        tmp_path / "train.yaml", data, max_length=64, max_steps=1, per_device_train_batch_size=4
    )
    first_ft = tmp_path / "ft0"
    run = run_cli("ftt-train", "--config", str(config), "--model_name_or_path", str(base),
                  "--output_dir", str(first_ft))  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert rows_of(first_ft) == rows
    work = tmp_path / "work"
    env = {**OFFLINE_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{OFFLINE_ENV['PATH']}"}
    run = run_cli(
        "ftt-iterate", "--train-config", str(config), "--source-base", str(base),
        "--source-finetuned", str(first_ft), "--targets", str(target), str(later),
        "--work-dir", str(work), env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for index in (1, 2):
        for stage in ("transferred", "finetuned"):
            assert rows_of(work / f"round{index}" / stage) == rows_of(first_ft) == rows
    assert "embedding rows" not in run.stdout + run.stderr  # nothing added or dropped


@pytest.mark.slow
def test_rows_dropped_on_request_are_said(tmp_path):
    """A recipe that asks for fewer rows than the target has gets them, with one line."""
    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    rows = -(-len(tokenizer) // 64) * 64 + 64
    models = [
        padded_model(tmp_path / name, seed, tokenizer, rows)
        for name, seed in (("target", 1), ("ft", 3), ("base", 2))
    ]
    recipe = transfer_recipe(models[0], [(models[1], 1.0)], models[2])
    recipe["tokenizer"] = {"source": str(models[1]), "pad_to_multiple_of": 1}
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    inspect = run_cli("ftt-inspect", "recipe.yml", cwd=tmp_path)
    line = (
        f"the output has {len(tokenizer)} embedding rows ({len(tokenizer)} tokens of "
        f"{models[1]}'s tokenizer), the target {rows}: the transfer drops "
        f"{rows - len(tokenizer)} rows."
    )
    assert inspect.returncode == 0, inspect.stderr
    assert f"note: {line}" in inspect.stdout
    merge = run_cli("mergekit-yaml", "recipe.yml", "out", cwd=tmp_path)
    assert merge.returncode == 0, merge.stderr
    assert f"mergekit-ftt: {line}" in merge.stderr.splitlines()
    assert rows_of(tmp_path / "out") == len(tokenizer)
    # Left unset, pad_to_multiple_of keeps the padded rows, and nothing is said.
    recipe["tokenizer"] = {"source": str(models[1])}
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    merge = run_cli("mergekit-yaml", "recipe.yml", "kept", cwd=tmp_path)
    assert merge.returncode == 0, merge.stderr
    assert "embedding rows" not in merge.stderr
    assert rows_of(tmp_path / "kept") == rows


@pytest.mark.slow
def test_eval_run_keeps_lm_eval_in_its_log(llama, tmp_path):
    """lm-eval's INFO lines, bars and `git` calls go to OUT/ftt-eval.log; the terminal gets
    the result paths only."""
    tasks = write_tiny_task(tmp_path / "tasks")
    run = run_cli(
        "ftt-eval", "run", "--model", f"x={llama.model('target', 1)}", "--tasks", "tiny_sum",
        "--include-path", str(tasks), "--output", "results", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr == ""
    (line,) = run.stdout.splitlines()
    assert line.startswith("x\ttiny_sum\tresults/x/results_")
    log = (tmp_path / "results" / "ftt-eval.log").read_text()
    assert "lm_eval" in log
