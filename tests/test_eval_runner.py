"""The runner end to end: a tiny local model through lm-eval's real hf backend on CPU.

The task is a local JSONL file with the machinery the shipped suites use (generate_until,
inline few-shot samples, chat template with multi-turn few-shot, regex + take_first filter,
exact_match). A random model's answers are arbitrary, so the expected score is planted: a
first run logs the generations; a second run scores a copy of the data whose targets equal
the first run's extracted answers on even documents only, so exactly half must match.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergekit_ftt import tiny
from mergekit_ftt.eval import BackendOptions, ModelSpec, evaluate_models, runner

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 1), (2, 2)]

TASK_YAML = """\
task: tiny_sum
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
num_fewshot: 2
fewshot_config:
  sampler: first_n
  samples:
    - {{question: "what is 1 plus 1?", answer: "2"}}
    - {{question: "what is 2 plus 3?", answer: "5"}}
generation_kwargs: {{until: ["\\n"], max_gen_toks: 8, do_sample: false}}
filter_list:
  - name: first-word
    filter:
      - {{function: regex, regex_pattern: "(\\\\S+)", group_select: 0}}
      - {{function: take_first}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
metadata: {{version: 1.0}}
"""

SUITE_YAML = """\
group: tiny-chat
task: [tiny_sum]
metadata:
  version: 1.0
  ftt:
    apply_chat_template: true
    fewshot_as_multiturn: true
    columns:
      - {task: tiny_sum, name: Sum, metrics: ["exact_match,first-word"]}
"""


def write_task(folder: Path, answers: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.jsonl"
    rows = [
        {"question": f"what is {a} plus {b}?", "answer": t}
        for (a, b), t in zip(QUESTIONS, answers, strict=True)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "tiny_sum.yaml").write_text(TASK_YAML.format(data=data), encoding="utf-8")
    (folder / "tiny-chat.yaml").write_text(SUITE_YAML, encoding="utf-8")
    return folder


def samples(model_dir: Path) -> list[dict]:
    (path,) = model_dir.glob("samples_tiny_sum_*.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def score(results_file: Path) -> float:
    return json.loads(results_file.read_text(encoding="utf-8"))["results"]["tiny_sum"][
        "exact_match,first-word"
    ]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    corpus = [f"the sum of {a} and {b} is {a + b}." for a in range(20) for b in range(20)]
    tokenizer = tiny.build_tokenizer(corpus, vocab_size=200)
    config = tiny.tiny_config(
        "llama",
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = tiny.save_random_model(config, root / "model", seed=0, tokenizer=tokenizer)
    tasks = write_task(root / "tasks1", [str(a + b) for a, b in QUESTIONS])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    # First run: the command a user types.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mergekit_ftt.eval.cli",
            "run",
            "--model",
            f"tiny={model}",
            "--suite",
            "tiny-chat",
            "--include-path",
            str(tasks),
            "--output",
            str(root / "out1"),
            "--backend",
            "hf",
            "--device",
            "cpu",
        ],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    return {"root": root, "model": model}


def test_cli_run_writes_lm_eval_layout_with_chat_prompts(workspace):
    model_dir = workspace["root"] / "out1" / "tiny"
    (results_file,) = model_dir.glob("results_*.json")
    results = json.loads(results_file.read_text(encoding="utf-8"))
    assert results["fewshot_as_multiturn"] is True and results["chat_template"]
    assert results["config"]["model_args"]["device"] == "cpu"
    assert results["config"]["model_args"]["dtype"] == "float32"
    logged = samples(model_dir)
    assert len(logged) == len(QUESTIONS)
    prompt = logged[0]["arguments"]["gen_args_0"]["arg_0"]
    # Two few-shot examples and the question, each its own chat turn.
    assert prompt.count("<|user|>\n") == 3 and prompt.count("<|assistant|>\n") == 3
    assert prompt.endswith("Question: what is 1 plus 2?\nAnswer:\n<|assistant|>\n")
    record = json.loads((model_dir / "ftt_run.json").read_text(encoding="utf-8"))
    assert record["model"] == {"label": "tiny", "pretrained": str(workspace["model"]), "base": None}


@pytest.fixture(scope="module")
def planted(workspace) -> dict[str, Path]:
    """Second run, in process, on data whose even targets are the first run's answers."""
    first = samples(workspace["root"] / "out1" / "tiny")
    answers = [
        s["filtered_resps"][0] if i % 2 == 0 else "never-generated" for i, s in enumerate(first)
    ]
    tasks = write_task(workspace["root"] / "tasks2", answers)
    out = workspace["root"] / "out2"
    spec = ModelSpec("tiny", str(workspace["model"]))
    written = evaluate_models(
        [spec],
        "tiny-chat",
        out,
        backend="hf",
        options=BackendOptions(device="cpu"),
        include_path=[tasks],
    )
    return {"tasks": tasks, "out": out, "results": written["tiny"]["tiny_sum"], "first": first}


def test_score_equals_exact_match_of_logged_answers(planted):
    logged = samples(planted["out"] / "tiny")
    by_hand = sum(s["filtered_resps"][0] == s["target"] for s in logged) / len(logged)
    assert by_hand == 0.5  # planted: the even half
    assert score(planted["results"]) == by_hand
    # Greedy decoding of the same prompts gives the same answers as the first run.
    assert [s["resps"] for s in logged] == [s["resps"] for s in planted["first"]]


def test_rerun_reads_finished_results_back(planted, monkeypatch):
    model_dir = planted["out"] / "tiny"
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir() if p.name != "ftt_run.json"}

    def no_model(*args, **kwargs):
        raise AssertionError("a finished task must not load the model")

    monkeypatch.setattr(runner, "_load_lm", no_model)
    spec = ModelSpec("tiny", planted["results"].parents[2].joinpath("model").as_posix())
    written = evaluate_models(
        [spec], "tiny-chat", planted["out"], backend="hf", include_path=[planted["tasks"]]
    )
    assert written["tiny"]["tiny_sum"] == planted["results"]
    after = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir() if p.name != "ftt_run.json"}
    assert after == before


def test_force_and_other_limit_recompute(planted):
    spec = ModelSpec("tiny", planted["results"].parents[2].joinpath("model").as_posix())
    options = BackendOptions(device="cpu")
    limited = evaluate_models(
        [spec],
        "tiny-chat",
        planted["out"],
        backend="hf",
        options=options,
        include_path=[planted["tasks"]],
        limit=2,
    )["tiny"]["tiny_sum"]
    assert limited != planted["results"]
    assert json.loads(limited.read_text(encoding="utf-8"))["results"]["tiny_sum"]["sample_len"] == 2
    forced = evaluate_models(
        [spec],
        "tiny-chat",
        planted["out"],
        backend="hf",
        options=options,
        include_path=[planted["tasks"]],
        force=True,
    )["tiny"]["tiny_sum"]
    assert forced not in (planted["results"], limited)
    assert score(forced) == score(planted["results"])


def test_label_holding_another_model_is_refused(planted):
    with pytest.raises(ValueError, match="holds results of"):
        evaluate_models(
            [ModelSpec("tiny", "/elsewhere/model")],
            "tiny-chat",
            planted["out"],
            backend="hf",
            include_path=[planted["tasks"]],
        )
