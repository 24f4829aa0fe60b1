"""`ftt-eval run` on a machine without Hub access (this one): one line naming what is
missing and how to fetch it, before anything is written."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from helpers import error_line

REPO = Path(__file__).resolve().parents[1]

TASK = """\
task: hub_task
dataset_path: allenai/no-such-cached-dataset
test_split: test
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
metric_list: [{metric: exact_match}]
"""


def ftt_eval(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(cwd / "hf")}
    env.pop("HF_HUB_OFFLINE", None)  # the command finds out by itself
    return subprocess.run(
        ["ftt-eval", "run", *args, "--output", str(cwd / "out")],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=300,
    )  # fmt: skip


def test_hub_model_out_of_reach(tmp_path):
    model = "b=meta-llama/Meta-Llama-3-8B"
    line = error_line(
        ftt_eval("--suite", "llama3-instruct", "--model", model, cwd=tmp_path), "ftt-eval"
    )
    assert "cannot load model 'meta-llama/Meta-Llama-3-8B': the Hub is unreachable" in line
    assert (
        "`hf download meta-llama/Meta-Llama-3-8B --local-dir" in line and "HF_HUB_OFFLINE=1" in line
    )
    assert not (tmp_path / "out").exists()


def test_misspelled_local_model_folder(tmp_path):
    line = error_line(ftt_eval("--tasks", "x", "--model", "m=./modle/", cwd=tmp_path), "ftt-eval")
    assert "model './modle/': no such local folder" in line
    assert not (tmp_path / "out").exists()


def test_task_dataset_out_of_reach(tmp_path, olmo2):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "hub_task.yaml").write_text(TASK)
    model = olmo2.model("m", seed=0)
    flags = ["--tasks", "hub_task", "--include_path", str(tmp_path / "tasks"), "--backend", "hf"]
    line = error_line(ftt_eval(*flags, "--model", f"m={model}", cwd=tmp_path), "ftt-eval")
    assert (
        "cannot load the dataset of task 'hub_task': Couldn't reach "
        "'allenai/no-such-cached-dataset' on the Hub" in line
    )
    assert "datasets.load_dataset('allenai/no-such-cached-dataset')" in line
    assert not (tmp_path / "out").exists()
