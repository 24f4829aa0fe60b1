"""The unmodified mergekit commands find ``finetuning_transfer`` after installation."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from conftest import OFFLINE_ENV, run_cli

REPO = Path(__file__).resolve().parents[1]


def python_says(python: str, code: str, **env: str | None) -> str:
    environment = {**OFFLINE_ENV, **env}
    environment = {key: value for key, value in environment.items() if value is not None}
    result = subprocess.run([python, "-c", code], env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_start_up_imports_neither_torch_nor_mergekit():
    code = (
        "import sys; from mergekit_ftt.hook import _MergekitFinder;"
        "print(any(isinstance(f, _MergekitFinder) for f in sys.meta_path),"
        " 'torch' in sys.modules, 'mergekit' in sys.modules)"
    )
    assert python_says(sys.executable, code) == "True False False"


def test_registered_on_first_import_of_mergekit():
    code = (
        "from mergekit.merge_methods import get; m = get('finetuning_transfer');"
        "print(m.spec.pretty_name, m.spec.reference_url)"
    )
    assert (
        python_says(sys.executable, code) == "Fine-tuning Transfer https://arxiv.org/abs/2503.20110"
    )


def test_importing_the_method_module_first_registers_it():
    """Importing our module before mergekit's method package must not re-enter it."""
    code = (
        "import mergekit_ftt.merge_methods.finetuning_transfer as m;"
        "from mergekit.merge_methods import get;"
        "print(get('finetuning_transfer') is m.finetuning_transfer)"
    )
    assert python_says(sys.executable, code) == "True"


def test_python_starts_when_mergekit_is_missing(tmp_path):
    """A broken or absent mergekit must not break interpreters (the hook waits)."""
    fake = tmp_path / "mergekit"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('mergekit is not installed')")
    assert python_says(sys.executable, "print('started')", PYTHONPATH=str(tmp_path)) == "started"


def test_mergekit_yaml_help_runs():
    result = run_cli("mergekit-yaml", "--help")
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_wheel_install_registers_through_pth(tmp_path):
    """A regular (non-editable) install ships the .pth at the root of site-packages."""
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheel_dir), str(REPO)],
        check=True, env=OFFLINE_ENV,
    )  # fmt: skip
    (wheel,) = wheel_dir.glob("mergekit_ftt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mergekit_ftt_hook.pth" in names
    assert not any(name.split("/")[0] in {"training", "eval", "tests"} for name in names)

    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = str(env_dir / "bin" / "python")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", str(wheel)],
        check=True, env=OFFLINE_ENV,
    )  # fmt: skip
    code = (
        "import mergekit_ftt; from mergekit.merge_methods import get;"
        f"print(mergekit_ftt.__file__.startswith({str(env_dir)!r}),"
        " get('finetuning_transfer').spec.name)"
    )
    # Without PYTHONPATH, so that a checkout on it cannot stand in for the wheel.
    assert python_says(python, code, PYTHONPATH=None) == "True finetuning_transfer"
