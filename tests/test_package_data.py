"""training/, eval/ and recipes/ are data: found by name in a checkout and in the wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import OFFLINE_ENV

from mergekit_ftt.errors import FttError
from mergekit_ftt.package_data import data_folder, find_data_file, shipped_names

REPO = Path(__file__).resolve().parents[1]


def test_data_files_are_found_by_name():
    # The checkout's folders, or the installed copies of them (`pip install .` then pytest).
    assert shipped_names("training") == sorted(
        path.relative_to(REPO / "training").with_suffix("").as_posix()
        for path in (REPO / "training").rglob("*.yaml")
        if not path.name.startswith("_")
    )
    assert "accelerate/zero3" in shipped_names("training")
    assert "_olmo2_math" not in shipped_names("training")  # only included by other configs
    suite = find_data_file("eval", "llama3-instruct")
    assert suite.read_text() == (REPO / "eval" / "llama3-instruct.yaml").read_text()
    assert data_folder("eval") == suite.parent
    assert find_data_file("recipes", "transfer_round").name == "transfer_round.yml"
    path = REPO / "recipes" / "llama3_plus_delta31.yml"
    assert find_data_file("recipes", str(path)) == path  # a path is taken as it is
    with pytest.raises(FttError, match="'nope' is neither a file nor a shipped recipes file"):
        find_data_file("recipes", "nope")


def test_no_python_package_named_training_or_eval():
    for folder in ("training", "eval", "recipes"):
        assert not list((REPO / folder).rglob("*.py")), folder


@pytest.mark.slow
def test_installed_wheel_finds_configs_suites_and_recipes_by_name(tmp_path):
    from hatchling.builders.wheel import WheelBuilder  # the build backend, in-process

    (wheel,) = WheelBuilder(str(REPO)).build(directory=str(tmp_path), versions=["standard"])
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = (
        "from mergekit_ftt.training.sft import parse_args;"
        "from mergekit_ftt.eval.suites import load_suite;"
        "from mergekit_ftt.training.iterate import load_template;"
        "from mergekit_ftt.package_data import data_folder;"
        "args = parse_args(['--config', 'olmo2_m5_math', '--use_cpu', 'true']);"
        "print(data_folder('training'));"
        "print(args[2].model_revision, args[1].max_steps);"
        "print(len(load_suite('llama3-instruct').columns), load_template()['merge_method'])"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,  # not the checkout
        env={**OFFLINE_ENV, "PYTHONPATH": str(tmp_path / "site")},  # before the checkout
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        str(tmp_path / "site" / "mergekit_ftt" / "_data" / "training"),
        "stage2-ingredient1-step11931-tokens50B 30000",
        "6 finetuning_transfer",
    ]
