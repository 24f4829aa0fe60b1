"""Every bad input we tried, run as a user types it; docs/errors.md is generated from here.

Each case is data: a shell ``setup`` run in a fresh working folder (which holds tiny local
models, a delta, a valid recipe and a local lm-eval task, see :func:`workspace`), the
``command``, and a fragment its error line must contain. A case passes when the command
exits with 2 (``mergekit-*``, click commands: 1), prints exactly one ``PROG: error: …``
line (click: ``Error: …``) and no traceback, and leaves the working folder exactly as it
found it. The table in docs/errors.md holds each case's command and the line the user
sees; a test fails when it differs from what the commands print, so it cannot drift:

    python tests/test_error_table.py --write-docs     # rewrite docs/errors.md
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from helpers import OFFLINE_ENV, TinyFamily, transfer_recipe, write_tiny_task

from mergekit_ftt.package_data import data_folder

DOC = Path(__file__).parents[1] / "docs" / "errors.md"
WORKDIR = "<work>"  # how the working folder is written in the table
TIMEOUT = 90  # a refusal comes in seconds


@dataclass(frozen=True)
class Case:
    command: str  # as typed in the working folder
    expect: str  # a fragment of the error line
    setup: str = ""  # shell commands run first, in the working folder

    @property
    def prog(self) -> str:
        return shlex.split(self.command)[0]


TASK = "--tasks tiny_sum --include-path tasks"
NO_WEIGHTS = "mkdir empty && cp target/config.json empty/"
TRUNCATED = "cp -r target cut && truncate -s 4000 cut/model.safetensors"
NOT_A_RECIPE = "printf 'hello: [1, 2\\n' > broken.yml"
A_FILE = "touch file"
EDIT_DELTA_CONFIG = (  # a tensor's recorded shape changed by hand
    "python -c \"import json; p = 'delta/delta_config.json'; "
    "c = json.load(open(p)); next(iter(c['tensors'].values()))['shape'][0] += 1; "
    "json.dump(c, open(p, 'w'))\""
)


PAPER_RECIPE = (  # recipes/llama3_plus_delta31.yml: three Hub models, none here
    'python -c "import shutil; from mergekit_ftt.package_data import data_folder; '
    "shutil.copy(data_folder('recipes') / 'llama3_plus_delta31.yml', 'paper.yml')\""
)


def task_edit(sed: str) -> str:
    """A setup that edits the tiny_sum task's YAML (tasks/tiny.yaml) with ``sed``."""
    return f"sed -i {shlex.quote(sed)} tasks/tiny.yaml"


def recipe_edit(expression: str, name: str = "edited.yml") -> str:
    """A setup that writes recipe.yml, edited by a Python ``expression`` on ``r``, to ``name``."""
    script = (
        "import yaml; r = yaml.safe_load(open('recipe.yml')); "
        f"{expression}; yaml.safe_dump(r, open('{name}', 'w'))"
    )
    return f"python -c {shlex.quote(script)}"


CASES: dict[str, Case] = {
    # --- ftt-eval -------------------------------------------------------------------------
    "eval: a folder without weights": Case(
        f"ftt-eval run --model x=empty {TASK} --output results", "has no weights", NO_WEIGHTS
    ),
    "eval: a truncated weight file": Case(
        f"ftt-eval run --model x=cut {TASK} --output results", "truncated or damaged", TRUNCATED
    ),
    "eval: a delta folder given as a model": Case(
        f"ftt-eval run --model x=delta {TASK} --output results", "is a delta folder"
    ),
    "eval: a folder that does not exist": Case(
        f"ftt-eval run --model x=./merged {TASK} --output results", "no such local folder"
    ),
    "eval: a path-like name, not a Hub id": Case(
        f"ftt-eval run --model x=target/nope {TASK} --output results", "no such local folder"
    ),
    "eval: a label that is no folder name": Case(
        f"ftt-eval run --model a/b=target {TASK} --output results", "cannot be a folder name"
    ),
    "eval: the same label twice": Case(
        f"ftt-eval run --model x=target --model x=ft {TASK} --output results", "must be unique"
    ),
    "eval: --output inside a file": Case(
        f"ftt-eval run --model x=target {TASK} --output file/results", "is a file", A_FILE
    ),
    "eval: --via-olmes with --tasks": Case(
        f"ftt-eval run --model x=target {TASK} --via-olmes --output results", "give --suite"
    ),
    "eval: --via-olmes with options it cannot pass on": Case(
        "ftt-eval run --model x=target --suite olmes-instruct --via-olmes --force --seed 3 "
        "--output results",
        "cannot apply --force, --seed",
    ),
    "eval: a --model without a label": Case(
        f"ftt-eval run --model target {TASK} --output results", "expected LABEL=VALUE"
    ),
    "eval: an --include-path that does not exist": Case(
        "ftt-eval run --model x=target --tasks tiny_sum --include-path nowhere --output results",
        "no folder nowhere",
    ),
    "eval: two Hub models, offline": Case(
        f"ftt-eval run --model a=org/one --model b=org/two {TASK} --output results",
        "cannot load 2 models (HF_HUB_OFFLINE is set)",
    ),
    "eval: report --out inside a file": Case(
        "ftt-eval report results --out file/report", "is a file", A_FILE
    ),
    "eval: report on a folder with no results": Case(
        "ftt-eval report target --out report", "target"
    ),
    # --- ftt-delta ------------------------------------------------------------------------
    "delta: --finetuned without --base": Case("ftt-delta extract --finetuned ft out", "--base"),
    "delta: an output folder that holds files": Case(
        "ftt-delta extract --finetuned ft --base base target", "--overwrite"
    ),
    "delta: models of different architectures": Case(
        "ftt-delta extract --finetuned olmo --base base out", "a delta is taken between"
    ),
    "delta: a recipe that does not exist": Case("ftt-delta extract nope.yml out", "nope.yml"),
    "delta: a file that is not YAML": Case(
        "ftt-delta extract broken.yml out", "broken.yml", NOT_A_RECIPE
    ),
    "delta: --density without sparsification": Case(
        "ftt-delta extract --finetuned ft --base base --density 0.5 out", "--density"
    ),
    "delta: the README's paper recipe, offline": Case(
        "ftt-delta extract paper.yml out",
        "cannot load 2 models (HF_HUB_OFFLINE is set): meta-llama/Llama-3.1-8B-Instruct",
        PAPER_RECIPE,
    ),
    "delta: info on a hand-edited delta_config.json": Case(
        "ftt-delta info delta", "was changed after extraction", EDIT_DELTA_CONFIG
    ),
    "delta: info on a model folder": Case("ftt-delta info target", "not a delta folder"),
    "delta: info --verify after a weight file changed": Case(
        "ftt-delta info --verify delta",
        "does not match the sha256",
        "python -c \"f=open('delta/delta.safetensors','r+b'); "
        "f.seek(-8, 2); f.write(b'01234567')\"",
    ),
    # --- ftt-inspect ----------------------------------------------------------------------
    "inspect: a recipe that does not exist": Case("ftt-inspect nope.yml", "nope.yml"),
    "inspect: a file that is not YAML": Case("ftt-inspect broken.yml", "broken.yml", NOT_A_RECIPE),
    "inspect: --json inside a file": Case(
        "ftt-inspect recipe.yml --json file/report.json", "is a file", A_FILE
    ),
    "inspect: --json is a folder": Case("ftt-inspect recipe.yml --json tasks", "is a folder"),
    "inspect: --plot of an unknown format": Case(
        "ftt-inspect recipe.yml --plot report.gif", "report.gif"
    ),
    "inspect: a model folder that does not exist": Case(
        "ftt-inspect edited.yml", "nope", recipe_edit("r['base_model'] = 'nope'")
    ),
    "inspect: the paper recipe, offline": Case(
        "ftt-inspect paper.yml", "cannot load 3 models (HF_HUB_OFFLINE is set)", PAPER_RECIPE
    ),
    # --- ftt-sweep ------------------------------------------------------------------------
    "sweep: --alphas that are not numbers": Case(
        f"ftt-sweep recipe.yml --alphas 0,a {TASK} --out sweep", "not a finite number"
    ),
    "sweep: an α given twice": Case(
        f"ftt-sweep recipe.yml --alphas 0,1,1 {TASK} --out sweep", "twice"
    ),
    "sweep: an empty α": Case(f"ftt-sweep recipe.yml --alphas 0,,1 {TASK} --out sweep", "empty"),
    "sweep: an unknown module kind": Case(
        f"ftt-sweep recipe.yml --alphas 0,1 --modules attn {TASK} --out sweep", "attn"
    ),
    "sweep: --out is a file": Case(
        f"ftt-sweep recipe.yml --alphas 0,1 {TASK} --out file", "is a file", A_FILE
    ),
    "sweep: --out holds something else": Case(
        f"ftt-sweep recipe.yml --alphas 0,1 {TASK} --out tasks", "not empty"
    ),
    "sweep: an --include-path that does not exist": Case(
        "ftt-sweep recipe.yml --alphas 0,1 --tasks tiny_sum --include-path nowhere --out sweep",
        "nowhere",
    ),
    "sweep: --out inside a file": Case(
        f"ftt-sweep recipe.yml --alphas 0,1 {TASK} --out file/sweep", "is a file", A_FILE
    ),
    "sweep: an unknown task": Case(
        "ftt-sweep recipe.yml --alphas 0,1 --tasks tiny_sun --include-path tasks --out sweep",
        "tiny_sun",
    ),
    "sweep: the paper recipe, offline": Case(
        f"ftt-sweep paper.yml --alphas 0,1 {TASK} --out sweep",
        "cannot load 3 models (HF_HUB_OFFLINE is set)",
        PAPER_RECIPE,
    ),
    "sweep: a task YAML that is not valid YAML": Case(
        f"ftt-sweep recipe.yml --alphas 0,1 {TASK} --out sweep",
        "not valid YAML",
        task_edit("s/^test_split: test/test_split: [test/"),
    ),
    "sweep: a task YAML that includes a missing file": Case(
        "ftt-sweep recipe.yml --alphas 0,1 --tasks tiny_inc --include-path tasks --out sweep",
        "it includes nothere.yaml",
        "printf 'include: nothere.yaml\\ntask: tiny_inc\\n' > tasks/inc.yaml",
    ),
    "sweep: a task YAML naming a metric lm-eval lacks": Case(
        f"ftt-sweep recipe.yml --alphas 0,1 {TASK} --out sweep",
        "'no_such_metric' is not a metric lm-eval knows",
        task_edit("s/metric: exact_match/metric: no_such_metric/"),
    ),
    "sweep: a task YAML whose !function does not import": Case(
        f"ftt-sweep recipe.yml --alphas 0,1 {TASK} --out sweep",
        "Cannot import module 'utils'",
        task_edit("s/^doc_to_text.*/doc_to_text: !function utils.doc_to_text/"),
    ),
    "sweep: a task YAML with an unknown output_type": Case(
        f"ftt-sweep recipe.yml --alphas 0,1 {TASK} --out sweep",
        "invalid output_type",
        task_edit("s/output_type: generate_until/output_type: generate/"),
    ),
    "sweep: a recipe that does not exist": Case(
        f"ftt-sweep nope.yml --alphas 0,1 {TASK} --out sweep", "nope.yml"
    ),
    # --- ftt-demo, ftt-train, ftt-iterate, ftt-fetch-checkpoints --------------------------
    "demo: --matrix 0": Case("ftt-demo --matrix 0 --out demo", "--matrix"),
    "demo: --matrix with --finetune-after": Case(
        "ftt-demo --matrix 1 --finetune-after --out demo", "--finetune-after"
    ),
    "demo: a seed both calibration and held-out": Case(
        "ftt-demo --calibration-seeds 0,1 --heldout-seeds 1,2 --out demo", "both calibration"
    ),
    "demo: held-out seed the shipped verdict was fitted on": Case(
        "ftt-demo --heldout-seeds 2,3 --out demo", "not held out"
    ),
    "demo: the Llama miniature without --matrix": Case(
        "ftt-demo --preset llama --out demo", "for the matrix"
    ),
    "train: a config file that does not exist": Case("ftt-train --config nope.yaml", "nope.yaml"),
    "fetch-checkpoints: an unknown checkpoint": Case(
        "ftt-fetch-checkpoints M9 --dest ckpts", "unknown checkpoint"
    ),
    # --- mergekit-yaml with a finetuning_transfer recipe ----------------------------------
    "mergekit-yaml: no source_base": Case(
        "mergekit-yaml edited.yml out",
        "source_base",
        recipe_edit("r['models'] = r['models'][:1]"),
    ),
    "mergekit-yaml: a weight on the source_base": Case(
        "mergekit-yaml edited.yml out",
        "weight",
        recipe_edit("r['models'][1]['parameters']['weight'] = 1.0"),
    ),
    "mergekit-yaml: a model folder that does not exist": Case(
        "mergekit-yaml edited.yml out", "nope", recipe_edit("r['base_model'] = './nope'")
    ),
    "mergekit-yaml: a target of another architecture": Case(
        "mergekit-yaml edited.yml out", "architecture", recipe_edit("r['base_model'] = 'olmo'")
    ),
    "mergekit-yaml: a target without weights": Case(
        "mergekit-yaml edited.yml out",
        "has no weights",
        f"{NO_WEIGHTS} && " + recipe_edit("r['base_model'] = 'empty'"),
    ),
    "mergekit-yaml: a truncated weight file": Case(
        "mergekit-yaml edited.yml out",
        "truncated or damaged",
        f"{TRUNCATED} && " + recipe_edit("r['base_model'] = 'cut'"),
    ),
    "mergekit-yaml: density without sparsification": Case(
        "mergekit-yaml edited.yml out",
        "density",
        recipe_edit("r['parameters'] = {'density': 0.5}"),
    ),
    "mergekit-yaml: a delta whose delta_config.json was edited": Case(
        "mergekit-yaml edited.yml out",
        "was changed after extraction",
        EDIT_DELTA_CONFIG
        + " && "
        + recipe_edit("r['models'] = [{'model': 'delta', 'parameters': {'role': 'delta'}}]"),
    ),
    "mergekit-yaml: the paper recipe, offline": Case(
        "mergekit-yaml paper.yml out", "cannot load 3 models (HF_HUB_OFFLINE is set)", PAPER_RECIPE
    ),
    "mergekit-yaml: an output folder that holds a model": Case(
        "mergekit-yaml recipe.yml target", "target"
    ),
}


# --- the working folder ---------------------------------------------------------------


def build_workspace(root: Path) -> Path:
    """Tiny models (target, ft, base: Llama; olmo: OLMo 2), their delta, a valid recipe
    and a local lm-eval task, all under ``root`` and named relative to it."""
    llama = TinyFamily(root, "llama")
    for name, seed in (("target", 1), ("ft", 3), ("base", 2)):
        llama.model(name, seed)
    TinyFamily(root, "olmo2").model("olmo", 4)
    recipe = transfer_recipe("target", [("ft", 1.0)], "base")
    (root / "recipe.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    write_tiny_task(root / "tasks", "tasks/sums.jsonl")  # the copies find their own
    subprocess.run(
        ["ftt-delta", "extract", "--finetuned", "ft", "--base", "base", "delta"],
        cwd=root,
        env=OFFLINE_ENV,
        check=True,
        capture_output=True,
    )
    (root / "delta.log").unlink(missing_ok=True)
    return root


def tree(root: Path) -> dict[str, int]:
    """Every path under ``root`` with its size (folders: -1)."""
    return {
        str(path.relative_to(root)): path.stat().st_size if path.is_file() else -1
        for path in root.rglob("*")
    }


@dataclass(frozen=True)
class Seen:
    returncode: int
    line: str  # the error line, the working folder written as WORKDIR
    problems: list[str]  # what breaks the convention


def run_case(case: Case, template: Path, work: Path) -> Seen:
    """Run ``case`` in ``work``, a fresh copy of ``template``."""
    shutil.copytree(template, work, symlinks=True)
    if case.setup:  # `python` there is the one running the tests
        path = f"{Path(sys.executable).parent}{os.pathsep}{OFFLINE_ENV.get('PATH', '')}"
        env = {**OFFLINE_ENV, "PATH": path}
        subprocess.run(case.setup, shell=True, cwd=work, check=True, env=env)
    before = tree(work)
    try:
        run = subprocess.run(
            shlex.split(case.command),
            cwd=work,
            env=OFFLINE_ENV,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired:  # it took the input and started working
        return Seen(-1, "", [f"still running after {TIMEOUT} s"])
    click = case.prog.startswith("mergekit-")
    # argparse names the subcommand too: "ftt-eval run: error: ..."
    prefix = re.compile("Error: " if click else rf"{re.escape(case.prog)}( \w+)?: error: ")
    lines = [line for line in run.stderr.splitlines() if prefix.match(line)]
    problems = []
    if run.returncode != (1 if click else 2):
        problems.append(f"exit status {run.returncode}")
    if "Traceback" in run.stderr:
        problems.append("a traceback")
    if len(lines) != 1:
        problems.append(f"{len(lines)} error lines")
    left = sorted(set(tree(work).items()) - set(before.items()))
    if left:
        problems.append(f"left behind or changed: {[path for path, _ in left]}")
    line = lines[0] if lines else (run.stderr.strip().splitlines() or [""])[-1]
    for path in {str(work), os.path.realpath(work)}:
        line = line.replace(path, WORKDIR)
    for kind in ("training", "recipes", "eval"):  # wherever the package is installed
        line = line.replace(str(data_folder(kind)), f"<mergekit-ftt's {kind}/>")
    return Seen(run.returncode, line, problems)


# --- docs/errors.md ---------------------------------------------------------------------

HEADER = """\
# What a bad input gets

Every bad input below was run as a user types it, in a folder holding tiny local models
(`target`, `ft`, `base`: Llama; `olmo`: OLMo 2), their delta (`delta`), a valid recipe
(`recipe.yml`) and a local lm-eval task (`tasks/`). Each command exits with status 2
(mergekit's own click commands: 1), prints the one line shown and no traceback, and leaves
the folder as it was. `<work>` stands for that folder.

This file is generated by `python tests/test_error_table.py --write-docs` from the cases
in tests/test_error_table.py; `pytest -m slow tests/test_error_table.py` fails when it differs
from what the commands print.

| # | Case | Setup, then command | What the user sees |
|---|---|---|---|
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def row(index: int, name: str, case: Case, line: str) -> str:
    typed = f"`{case.command}`"
    if case.setup:
        typed = f"`{case.setup}`; {typed}"
    return f"| {index} | {_cell(name)} | {_cell(typed)} | {_cell(line)} |\n"


def documented() -> dict[str, str]:
    """Case name -> the line docs/errors.md shows for it."""
    table = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = re.split(r"(?<!\\) \| ", line.strip("| "))
        if len(cells) == 4 and cells[0].isdigit():
            table[cells[1].replace("\\|", "|")] = cells[3].replace("\\|", "|")
    return table


def write_docs(lines: dict[str, str]) -> None:
    rows = [row(i, name, CASES[name], lines[name]) for i, name in enumerate(CASES, 1)]
    DOC.write_text(HEADER + "".join(rows), encoding="utf-8")


# --- the tests --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("workspace"))


def test_the_table_lists_every_case_and_nothing_else():
    """Fast: adding, renaming or removing a case needs `--write-docs`."""
    assert list(documented()) == list(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_bad_input(name, template, tmp_path):
    case = CASES[name]
    seen = run_case(case, template, tmp_path / "work")
    assert not seen.problems, f"{case.command}: {seen.problems}\n{seen.line}"
    assert case.expect in seen.line
    assert documented()[name] == seen.line, "run `python tests/test_error_table.py --write-docs`"


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--write-docs"]:
        sys.exit(__doc__)
    with tempfile.TemporaryDirectory() as scratch:
        cache = Path(scratch) / "cache"
        for variable in ("XDG_CACHE_HOME", "HF_HOME", "NUMBA_CACHE_DIR"):
            OFFLINE_ENV[variable] = str(cache / variable.lower())
        built = build_workspace(Path(scratch) / "template")
        seen = {
            name: run_case(c, built, Path(scratch) / f"case{i}")
            for i, (name, c) in enumerate(CASES.items())
        }
    for name, result in seen.items():
        mark = "ok " if not result.problems and CASES[name].expect in result.line else "BAD"
        print(f"{mark} {name}: {result.line} {result.problems}", file=sys.stderr, flush=True)
    write_docs({name: result.line for name, result in seen.items()})
    print(f"wrote {DOC}")
