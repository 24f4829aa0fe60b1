"""``ftt-sweep`` as a user runs it: help, errors before any merge, a real sweep through
lm-eval's hf backend, resume, planted scores and the best recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import run_cli, stored_delta_recipe

from mergekit_ftt.sweep.cli import build_parser, main

TASK_YAML = """\
task: tiny_choice
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
metadata: {{version: 1.0}}
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    rows = [
        {
            "question": f"the sum of {a} and {b} is",
            "choices": [str(a + b), str(a + b + 1)],
            "label": a % 2,
        }
        for a, b in ((1, 2), (3, 4), (5, 6), (7, 8), (9, 1), (2, 2))
    ]
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_choice.yaml").write_text(TASK_YAML.format(data=data))
    return folder


@pytest.fixture(scope="module")
def recipe(llama, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "transfer.yml"
    recipe = {
        "merge_method": "finetuning_transfer",
        "base_model": str(llama.model("target", 1)),
        "dtype": "bfloat16",
        "models": [
            {"model": str(llama.model("ft_a", 3)), "parameters": {"role": "source_finetuned"}},
            {"model": str(llama.model("source_base", 2)), "parameters": {"role": "source_base"}},
        ],
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_help_documents_every_option():
    result = run_cli("ftt-sweep", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for action in build_parser()._actions:
        assert action.help, action.dest
        for flag in action.option_strings:
            assert flag in text, flag
    for words in ("RECIPE.yml", "embeddings, attention, mlp, norms", "built in memory"):
        assert words in text


def sweep_args(recipe: Path, out: Path, task_dir: Path, *extra: str) -> list[str]:
    return [
        str(recipe),
        "--alphas",
        "0,0.5,1",
        "--tasks",
        "tiny_choice",
        "--include-path",
        str(task_dir),
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--alphas": ""}, "--alphas '' has an empty value"),
        ({"--alphas": "0,1,one"}, "'one' is not a finite number"),
        ({"--alphas": "1,1"}, "lists 1 twice"),
        ({"--modules": "mlp,other"}, "choose from embeddings, attention, mlp, norms"),
        ({"recipe": "ties"}, "uses merge_method 'ties'; ftt-sweep scales the delta weights"),
        ({"--tasks": None, "--suite": "no-such-suite"}, "unknown suite 'no-such-suite'"),
        ({"--backend": "vllm"}, "the vllm backend needs vLLM, which is not installed"),
        ({"--out": "file"}, "is a file; give a folder"),
        ({"--out": "other"}, "is not empty and holds no sweep"),
    ],
)
def test_bad_input_is_named_before_any_merge(change, message, recipe, task_dir, tmp_path, capsys):
    out = tmp_path / "out"
    if change.get("--out") == "file":
        out.write_text("")
    if change.get("--out") == "other":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    if change.get("recipe") == "ties":
        recipe = tmp_path / "ties.yml"
        recipe.write_text("merge_method: ties\nbase_model: t\nmodels: [{model: a}, {model: b}]\n")
    args = sweep_args(recipe, out, task_dir)
    for flag, value in change.items():
        if flag in ("recipe", "--out"):
            continue
        if flag in args:
            index = args.index(flag)
            del args[index : index + 2]
        if value is not None:
            args += [flag, value]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("ftt-sweep: error: ") and message in error, error
    assert "Traceback" not in error
    if out.is_dir():  # nothing merged or evaluated; only a log may be there
        assert {p.name for p in out.iterdir()} <= {"sweep.log", "notes.txt"}


@pytest.mark.slow
def test_unknown_task_is_named_before_any_merge(recipe, task_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = sweep_args(recipe, out, task_dir)
    args[args.index("tiny_choice")] = "tiny_choice,no_such_task_xyz"
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "ftt-sweep: error: lm-eval knows no task or group named no_such_task_xyz" in error
    assert not (out / "recipes").exists() and not (out / "eval").exists()


def results_files(out: Path) -> dict[str, list[Path]]:
    return {d.name: sorted(d.glob("results_*.json")) for d in sorted((out / "eval").iterdir())}


def loglikelihoods(model_dir: Path) -> list:
    """The model's log-likelihood of every choice, from the newest samples file."""
    path = sorted(model_dir.glob("samples_tiny_choice_*.jsonl"))[-1]
    return [json.loads(line)["resps"] for line in path.read_text().splitlines()]


def plant(path: Path, accuracy: float) -> None:
    results = json.loads(path.read_text())
    results["results"]["tiny_choice"]["acc,none"] = accuracy
    path.write_text(json.dumps(results))


# Planted accuracies: on all tensors best at α = 0.5; on the MLP best at α = 0 (best overall).
PLANTED = {"all@0": 0.25, "all@0.5": 0.75, "all@1": 0.5, "mlp@0": 1.0, "mlp@0.5": 0.0}


@pytest.mark.slow
def test_sweep_resumes_reports_planted_scores_and_builds_alike_on_disk(recipe, task_dir, tmp_path):
    out = tmp_path / "sweep"
    args = ["ftt-sweep", *sweep_args(recipe, out, task_dir, "--modules", "mlp", "--limit", "6")]

    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert "variants built in memory, inputs read once" in first.stdout
    assert first.stdout.count("built in memory in") == 5
    record = json.loads((out / "sweep.json").read_text())
    assert set(record["variants"]) == set(PLANTED)
    # Each input tensor was read from disk once for the five variants.
    assert len(set(record["tensors_read_from_disk"].values())) == 1
    measured = {}
    for label, (path,) in results_files(out).items():
        measured[label] = loglikelihoods(path.parent)
        plant(path, PLANTED[label])

    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("evaluated earlier") == 5
    assert "built in memory in" not in second.stdout
    assert all(len(files) == 1 for files in results_files(out).values())
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["best_alpha"]["all"]["tiny_choice"] == 0.5
    assert report["best_alpha"]["mlp"]["tiny_choice"] == 0.0
    assert report["best"]["variant"] == "mlp@0"
    best = (out / "report" / "best_recipe.yml").read_text()
    assert best == (out / "recipes" / "mlp@0.yml").read_text()
    weight = yaml.safe_load(best)["models"][0]["parameters"]["weight"]
    assert weight == [{"filter": ".mlp.", "value": 0.0}, {"value": 1.0}]
    assert "| 0.5 | **75.0** |" in second.stdout  # the table printed, best in bold
    csv_lines = (out / "report" / "report.csv").read_text().splitlines()
    assert csv_lines[0] == "kind,alpha,variant,tiny_choice,mean"
    assert "mlp,1,all@1,50.0,50.0" in csv_lines
    assert (out / "report" / "report.png").stat().st_size > 0

    forced = run_cli(*args, "--force", "--build", "disk")
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.count("written by mergekit in") == 5
    # Variants built on disk are removed once evaluated; the folder itself may stay.
    assert not (out / "variants").exists() or not any((out / "variants").iterdir())
    for label, files in results_files(out).items():
        assert len(files) == 2
        # The variant written by mergekit and the one built in memory: the same model.
        assert loglikelihoods(out / "eval" / label) == measured[label], label
    assert len({str(v) for v in measured.values()}) == 5  # and the variants differ


def test_out_holding_another_recipes_sweep_is_refused(recipe, task_dir, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "recipes").mkdir(parents=True)
    (out / "sweep.json").write_text("{}")
    (out / "recipes" / "all@0.5.yml").write_text("merge_method: finetuning_transfer\n")
    assert main(sweep_args(recipe, out, task_dir)) == 2
    error = capsys.readouterr().err
    assert "all@0.5.yml holds another recipe than this sweep's all@0.5" in error
    assert "pass --force" in error
    assert [p.name for p in (out / "recipes").iterdir()] == ["all@0.5.yml"]  # nothing written
    assert (out / "recipes" / "all@0.5.yml").read_text() == "merge_method: finetuning_transfer\n"
    assert not (out / "eval").exists()


@pytest.mark.slow
def test_sweep_over_a_stored_delta_runs_alike_in_memory_and_on_disk(llama, task_dir, tmp_path):
    """``ftt-sweep`` on a recipe with `role: delta` (it used to end in a traceback): both
    builds evaluate the same models (mergekit-yaml equality: test_sweep_variants.py)."""
    recipe = stored_delta_recipe(llama, tmp_path)
    out = tmp_path / "sweep"
    args = ["ftt-sweep", *sweep_args(recipe, out, task_dir, "--limit", "6")]
    in_memory = run_cli(*args)
    assert in_memory.returncode == 0, in_memory.stderr
    assert in_memory.stdout.count("built in memory in") == 3
    measured = {label: loglikelihoods(out / "eval" / label) for label in results_files(out)}
    on_disk = run_cli(*args, "--force", "--build", "disk")
    assert on_disk.returncode == 0, on_disk.stderr
    assert on_disk.stdout.count("written by mergekit in") == 3
    for label, expected in measured.items():
        assert loglikelihoods(out / "eval" / label) == expected, label
    assert len({str(v) for v in measured.values()}) == 3  # α changes the model
