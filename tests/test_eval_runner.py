"""The runner end to end: a tiny local model through lm-eval's real hf backend on CPU.

The task is a local JSONL file with the machinery the shipped suites use (generate_until,
inline few-shot samples, chat template with multi-turn few-shot, regex + take_first filter,
exact_match), and a second column shaped like the OLMES MMLU/MATH groups: a group whose
shared keys configure inline member tasks, macro-averaged, run without the chat template
(a per-column override). A random model's answers are arbitrary, so the expected score is planted: a
first run logs the generations; a second run scores a copy of the data whose targets equal
the first run's extracted answers on even documents only, so exactly half must match.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest

from mergekit_ftt import tiny
from mergekit_ftt.errors import FttError
from mergekit_ftt.eval import BackendOptions, ModelSpec, cli, evaluate_models, runner

pytestmark = pytest.mark.slow

QUESTIONS = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 1), (2, 2)]

# What the task and the group share: a one-word generated answer, scored by exact match.
GENERATED_ANSWER = """\
dataset_path: json
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
generation_kwargs: {{until: ["\\n"], max_gen_toks: 8, do_sample: false}}
filter_list:
  - name: first-word
    filter:
      - {{function: regex, regex_pattern: "(\\\\S+)", group_select: 0}}
      - {{function: take_first}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
"""

TASK_YAML = (
    """\
task: tiny_sum
dataset_kwargs:
  data_files:
    test: {data}
num_fewshot: 2
fewshot_config:
  sampler: first_n
  samples:
    - {{question: "what is 1 plus 1?", answer: "2"}}
    - {{question: "what is 2 plus 3?", answer: "5"}}
metadata: {{version: 1.0}}
"""
    + GENERATED_ANSWER
)

MACRO_YAML = (
    """\
group: tiny_macro
task:
  - {{task: tiny_macro_a, dataset_kwargs: {{data_files: {{test: {a}}}}}}}
  - {{task: tiny_macro_b, dataset_kwargs: {{data_files: {{test: {b}}}}}}}
aggregate_metric_list:
  - {{metric: exact_match, filter_list: first-word, aggregation: mean, weight_by_size: false}}
"""
    + GENERATED_ANSWER
)

SUITE_YAML = """\
group: tiny-chat
task: [tiny_sum, tiny_macro]
metadata:
  version: 1.0
  ftt:
    apply_chat_template: true
    fewshot_as_multiturn: true
    columns:
      - {task: tiny_sum, name: Sum, metrics: ["exact_match,first-word"]}
      - {task: tiny_macro, name: Macro, metrics: ["exact_match,first-word"], apply_chat_template: false}
"""


def write_jsonl(path: Path, questions: list[tuple[int, int]], answers: list[str]) -> Path:
    rows = [
        {"question": f"what is {a} plus {b}?", "answer": t}
        for (a, b), t in zip(questions, answers, strict=True)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_tasks(folder: Path, sum_answers: list[str], macro_answers: list[str]) -> Path:
    """The suite folder: tiny_sum on all questions, tiny_macro split 4 + 2 over two members."""
    folder.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(folder / "data.jsonl", QUESTIONS, sum_answers)
    a = write_jsonl(folder / "a.jsonl", QUESTIONS[:4], macro_answers[:4])
    b = write_jsonl(folder / "b.jsonl", QUESTIONS[4:], macro_answers[4:])
    (folder / "tiny_sum.yaml").write_text(TASK_YAML.format(data=data), encoding="utf-8")
    (folder / "tiny_macro.yaml").write_text(MACRO_YAML.format(a=a, b=b), encoding="utf-8")
    (folder / "tiny-chat.yaml").write_text(SUITE_YAML, encoding="utf-8")
    return folder


SUBTASKS = ("tiny_sum", "tiny_macro::tiny_macro_a", "tiny_macro::tiny_macro_b")


def samples(model_dir: Path, task: str = "tiny_sum") -> list[dict]:
    (path,) = model_dir.glob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def metrics(results_file: Path) -> dict[str, float]:
    results = json.loads(results_file.read_text(encoding="utf-8"))["results"]
    return {name: r["exact_match,first-word"] for name, r in results.items()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    corpus = [f"the sum of {a} and {b} is {a + b}." for a in range(20) for b in range(20)]
    tokenizer = tiny.build_tokenizer(corpus, vocab_size=200)
    config = tiny.tiny_config_for(tokenizer, "llama")
    model = tiny.save_random_model(config, root / "model", seed=0, tokenizer=tokenizer)
    truth = [str(a + b) for a, b in QUESTIONS]
    tasks = write_tasks(root / "tasks1", truth, truth)
    # First run: the command line a user types, parsed and run by the console entry point
    # in this process (a subprocess would pay lm-eval's ~10 s import again).
    # lm-eval's spellings (--include_path, --batch_size, --model_args) work beside ours.
    argv = f"run --model tiny={model} --suite tiny-chat --include_path {tasks} --output {root / 'out1'}"
    flags = [
        "--backend",
        "hf",
        "--device",
        "cpu",
        "--batch_size",
        "8",
        "--model_args",
        "max_length=512",
    ]
    assert cli.main([*argv.split(), *flags]) == 0
    return {"root": root, "model": model}


def test_cli_run_writes_lm_eval_layout_with_per_column_chat_settings(workspace):
    model_dir = workspace["root"] / "out1" / "tiny"
    by_task = {
        name: path
        for path in model_dir.glob("results_*.json")
        for name in json.loads(path.read_text(encoding="utf-8"))["results"]
    }
    assert set(by_task) == {"tiny_sum", *SUBTASKS[1:], "tiny_macro"}
    chat_run = json.loads(by_task["tiny_sum"].read_text(encoding="utf-8"))
    assert chat_run["fewshot_as_multiturn"] is True and chat_run["chat_template"]
    assert chat_run["config"]["model_args"]["device"] == "cpu"
    assert chat_run["config"]["model_args"]["dtype"] == "float32"
    assert chat_run["config"]["model_args"]["max_length"] == 512
    plain_run = json.loads(by_task["tiny_macro"].read_text(encoding="utf-8"))
    assert plain_run["fewshot_as_multiturn"] is False and plain_run["chat_template"] is None

    logged = samples(model_dir)
    assert len(logged) == len(QUESTIONS)
    prompt = logged[0]["arguments"]["gen_args_0"]["arg_0"]
    # Two few-shot examples and the question, each its own chat turn.
    assert prompt.count("<|user|>\n") == 3 and prompt.count("<|assistant|>\n") == 3
    assert prompt.endswith("Question: what is 1 plus 2?\nAnswer:\n<|assistant|>\n")
    plain_prompt = samples(model_dir, SUBTASKS[2])[0]["arguments"]["gen_args_0"]["arg_0"]
    assert plain_prompt == "Question: what is 9 plus 1?\nAnswer:"

    record = json.loads((model_dir / "ftt_run.json").read_text(encoding="utf-8"))
    assert record["model"] == {"label": "tiny", "pretrained": str(workspace["model"]), "base": None}


def plant(first: list[dict], keep) -> list[str]:
    """Targets equal to the first run's extracted answers where ``keep(i)``."""
    return [s["filtered_resps"][0] if keep(i) else "never-generated" for i, s in enumerate(first)]


@pytest.fixture(scope="module")
def planted(workspace) -> dict:
    """Second run, in process, on data whose targets are partly the first run's answers."""
    first = {task: samples(workspace["root"] / "out1" / "tiny", task) for task in SUBTASKS}
    even = lambda i: i % 2 == 0  # noqa: E731
    macro = plant(first[SUBTASKS[1]], even) + plant(first[SUBTASKS[2]], lambda i: True)
    tasks = write_tasks(workspace["root"] / "tasks2", plant(first["tiny_sum"], even), macro)
    out = workspace["root"] / "out2"
    spec = ModelSpec("tiny", str(workspace["model"]))
    written = evaluate_models(
        [spec],
        "tiny-chat",
        out,
        backend="hf",
        options=BackendOptions(device="cpu", batch_size=8),
        include_path=[tasks],
    )
    return {"tasks": tasks, "out": out, "spec": spec, "written": written["tiny"], "first": first}


def test_scores_equal_exact_match_of_logged_answers(planted):
    model_dir = planted["out"] / "tiny"
    by_hand = {}
    for task in SUBTASKS:
        logged = samples(model_dir, task)
        by_hand[task] = sum(s["filtered_resps"][0] == s["target"] for s in logged) / len(logged)
        # Greedy decoding of the same prompts gives the same answers as the first run.
        assert [s["resps"] for s in logged] == [s["resps"] for s in planted["first"][task]]
    assert by_hand == {"tiny_sum": 0.5, SUBTASKS[1]: 0.5, SUBTASKS[2]: 1.0}  # as planted
    assert metrics(planted["written"]["tiny_sum"])["tiny_sum"] == by_hand["tiny_sum"]
    group = metrics(planted["written"]["tiny_macro"])
    assert group[SUBTASKS[1]] == 0.5 and group[SUBTASKS[2]] == 1.0
    assert group["tiny_macro"] == 0.75  # macro average of the members (micro would be 4/6)


def test_rerun_reads_finished_results_back(planted, monkeypatch):
    model_dir = planted["out"] / "tiny"
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir() if p.name != "ftt_run.json"}

    def no_model(*args, **kwargs):
        raise AssertionError("a finished task must not load the model")

    monkeypatch.setattr(runner, "_load_lm", no_model)
    written = evaluate_models(
        [planted["spec"]],
        "tiny-chat",
        planted["out"],
        backend="hf",
        include_path=[planted["tasks"]],
    )
    assert written["tiny"] == planted["written"]
    after = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir() if p.name != "ftt_run.json"}
    assert after == before


def test_other_settings_or_force_recompute(planted):
    """Results are reused only for the same limit and chat settings; --force recomputes."""
    run = functools.partial(
        evaluate_models,
        [planted["spec"]],
        ["tiny_sum"],  # a task list instead of the suite: no chat template
        planted["out"],
        backend="hf",
        options=BackendOptions(device="cpu", batch_size=8),
        include_path=[planted["tasks"]],
    )
    plain = run()["tiny"]["tiny_sum"]
    assert plain != planted["written"]["tiny_sum"]
    limited = run(limit=2)["tiny"]["tiny_sum"]
    assert limited != plain
    assert json.loads(limited.read_text(encoding="utf-8"))["results"]["tiny_sum"]["sample_len"] == 2
    assert run(limit=2)["tiny"]["tiny_sum"] == limited
    forced = run(limit=2, force=True)["tiny"]["tiny_sum"]
    assert forced not in (plain, limited)
    assert metrics(forced) == metrics(limited)


def test_label_holding_another_model_is_refused(planted, tmp_path):
    other = shutil.copytree(planted["spec"].pretrained, tmp_path / "other")
    with pytest.raises(FttError, match="holds results of"):
        evaluate_models(
            [ModelSpec("tiny", str(other))],
            "tiny-chat",
            planted["out"],
            backend="hf",
            include_path=[planted["tasks"]],
        )
