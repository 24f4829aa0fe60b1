"""`ftt-eval run` on a machine without Hub access (this one): one line naming what is
missing and how to fetch it, before anything is written."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import error_line, write_tiny_task

from mergekit_ftt.eval import runner
from mergekit_ftt.eval.suites import adhoc_suite

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
    flags = ["--tasks", "tiny_sum", "--include-path", str(write_task(tmp_path))]
    line = error_line(ftt_eval(*flags, "--model", model, cwd=tmp_path), "ftt-eval")
    assert line.startswith(
        "ftt-eval: error: cannot load meta-llama/Meta-Llama-3-8B: huggingface.co cannot be"
    )
    assert "not a local folder nor in the Hugging Face cache" in line
    assert "(`hf download meta-llama/Meta-Llama-3-8B`) then it loads from the Hugging" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # lm-eval indexes its built-in tasks: 12 s
def test_every_model_and_dataset_out_of_reach_at_once(tmp_path):
    """Two Hub models and the suite's six Hub datasets: one line names all eight, each with
    the command that fetches it."""
    models = ["--model", "a=meta-llama/Meta-Llama-3-8B", "--model", "b=meta-llama/Llama-3.1-8B"]
    line = error_line(ftt_eval("--suite", "llama3-instruct", *models, cwd=tmp_path), "ftt-eval")
    assert line.startswith(
        "ftt-eval: error: cannot load 2 models and 6 datasets (huggingface.co cannot be "
    )
    for model in ("meta-llama/Meta-Llama-3-8B", "meta-llama/Llama-3.1-8B"):
        assert (
            f"{model}: not a local folder nor in the Hugging Face cache; fetch it with "
            f"`hf download {model}` where the Hub is reachable"
        ) in line
    assert (
        "openai/gsm8k (the dataset of task 'gsm8k_llama'): not in the datasets cache; fetch "
        "it with `lm-eval run --model dummy --tasks gsm8k_llama --limit 1` where" in line
    )
    assert "google/IFEval (the dataset of task 'ifeval')" in line
    assert not (tmp_path / "out").exists()


def write_task(folder: Path) -> Path:
    return write_tiny_task(folder / "tasks")


def test_misspelled_local_model_folder(tmp_path):
    flags = ["--tasks", "tiny_sum", "--include-path", str(write_task(tmp_path))]
    line = error_line(ftt_eval(*flags, "--model", "m=./modle/", cwd=tmp_path), "ftt-eval")
    assert "model './modle/': no such local folder" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # 11 s at load 2 on 2 cores
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
    fetch = "lm-eval run --model dummy --tasks hub_task --limit 1 --include_path"
    assert f"To use it offline, fetch it with `{fetch} {tmp_path / 'tasks'}` where" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda text: text, None),
        (  # scored by its own function, as ifeval is: lm-eval stores None for the metric
            lambda text: (
                text.replace("metric: exact_match", "metric: own_score")
                + "process_results: !function utils.process_results\n"
            ),
            None,
        ),
        (
            lambda text: text.replace("metric: exact_match", "metric: no_such_metric"),
            "lm-eval cannot build it: 'no_such_metric' is not a metric lm-eval knows",
        ),
    ],
    ids=["a plain task", "own process_results", "an unknown metric"],
)
def test_a_metric_lm_eval_lacks_is_found_before_any_model_loads(tmp_path, edit, problem):
    tasks = write_tiny_task(tmp_path / "tasks")
    (tasks / "tiny.yaml").write_text(edit((tasks / "tiny.yaml").read_text()))
    (tasks / "utils.py").write_text("def process_results(doc, results):\n    return {}\n")
    manager = runner.task_manager([tasks], ["tiny_sum"])
    missing = runner.missing_datasets(adhoc_suite(["tiny_sum"]), manager, [tasks])
    assert [m.problem for m in missing] == ([problem] if problem else [])


def test_task_files_that_are_not_yaml_are_named(tmp_path):
    (tmp_path / "good.yaml").write_text("task: a\ndoc_to_text: !function utils.x\n")
    (tmp_path / "bad.yaml").write_text("task: b\ntest_split: [test\n")
    (tmp_path / "inc.yaml").write_text("include: nothere.yaml\ntask: c\n")
    (bad, problem), (inc, missing) = runner.unreadable_yaml([tmp_path])
    assert bad == tmp_path / "bad.yaml"
    assert problem.startswith("not valid YAML, line 3: expected ',' or ']'")
    assert (inc, missing) == (
        tmp_path / "inc.yaml",
        f"it includes nothere.yaml, which is not in {tmp_path}",
    )
