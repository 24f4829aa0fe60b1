"""The unmodified mergekit commands find ``finetuning_transfer`` after installation."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from helpers import OFFLINE_ENV, merge, run_cli

REPO = Path(__file__).resolve().parents[1]


def outer_site_dirs() -> list[str]:
    """The site-packages folders of the interpreter running the tests."""
    dirs = site.getsitepackages()
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    return dirs


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


def test_hook_imports_nothing_at_start_up():
    """The .pth line runs in every interpreter: it may load only the hook module itself.

    (``-S``: without site, so that the modules other .pth files load do not count.)
    """
    code = (
        "import sys; before = set(sys.modules); import mergekit_ftt.hook;"
        "print(sorted(set(sys.modules) - before))"
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={**OFFLINE_ENV, "PYTHONPATH": os.pathsep.join([str(REPO), *outer_site_dirs()])},
        capture_output=True,
        text=True,
    )
    assert result.stdout.strip() == "['mergekit_ftt', 'mergekit_ftt.hook']", result.stderr


def test_wrapped_loader_is_the_real_one_to_everyone_else():
    code = (
        "import importlib.resources, sys, mergekit.merge_methods as m;"
        "loader = m.__spec__.loader;"
        "print(type(loader).__name__, loader.is_package('mergekit.merge_methods'),"
        " loader.get_filename('mergekit.merge_methods') == m.__file__,"
        " importlib.resources.files('mergekit.merge_methods').joinpath('registry.py').is_file())"
    )
    assert python_says(sys.executable, code) == "_ExtendAfterExec True True True"


def test_finder_stays_on_meta_path_while_it_finds():
    """It asks the finders below it; it never takes itself off ``sys.meta_path``."""
    code = (
        "import sys; from mergekit_ftt.hook import _MergekitFinder\n"
        "seen = []\n"
        "class Watch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'mergekit.merge_methods':\n"
        "            seen.append([type(f).__name__ for f in sys.meta_path][:2])\n"
        "sys.meta_path.insert(1, Watch())\n"
        "import mergekit.merge_methods\n"
        "print(seen)"
    )
    assert python_says(sys.executable, code) == "[['_MergekitFinder', 'Watch']]"


def moved_symbol_mergekit(root: Path, old: str, new: str) -> Path:
    """A copy of the installed mergekit with ``old`` renamed ``new`` in every module (its
    own callers included), as a later mergekit release might move a symbol."""
    import mergekit

    copy = root / "mergekit"
    shutil.copytree(
        Path(mergekit.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__")
    )
    sources = [file for file in copy.rglob("*.py") if old in file.read_text()]
    assert sources, f"{old} is not in mergekit"
    for file in sources:
        file.write_text(file.read_text().replace(old, new))
    return root


@pytest.mark.slow
def test_moved_registry_symbol_disables_the_plugin_and_mergekit_merges(llama, tmp_path):
    fake = moved_symbol_mergekit(tmp_path / "fake", "registered_methods", "available_methods")
    recipe = {
        "merge_method": "linear",
        "dtype": "bfloat16",
        "models": [
            {"model": str(llama.model("target", 1)), "parameters": {"weight": 0.5}},
            {"model": str(llama.model("ft_a", 3)), "parameters": {"weight": 0.5}},
        ],
    }
    result, out = merge(recipe, tmp_path, env={**OFFLINE_ENV, "PYTHONPATH": str(fake)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "config.json").exists()
    warnings = [line for line in result.stderr.splitlines() if line.startswith("mergekit-ftt")]
    assert len(warnings) == 1, result.stderr[-3000:]
    assert "could not extend mergekit.merge_methods (AttributeError" in warnings[0]
    assert "finetuning_transfer is unavailable" in warnings[0]
    assert "mergekit==0.1.5" in warnings[0]


@pytest.mark.slow
def test_moved_run_merge_unregisters_the_method_with_one_warning(tmp_path):
    fake = moved_symbol_mergekit(tmp_path / "fake", "def run_merge(", "def run(")
    registered, warnings = registered_with(fake)
    assert registered == 0
    assert len(warnings) == 1 and "could not extend mergekit.merge (AttributeError" in warnings[0]


def registered_with(path: Path) -> tuple[int, list[str]]:
    """How often ``finetuning_transfer`` is registered once mergekit is imported with
    ``path`` ahead on ``PYTHONPATH``, and the plugin's warnings."""
    code = (
        "import mergekit.merge_methods as m, mergekit.merge, mergekit.common;"
        "print([x.spec.name for x in m.registered_methods()].count('finetuning_transfer'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**OFFLINE_ENV, "PYTHONPATH": str(path)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    return int(result.stdout), [line for line in lines if line.startswith("mergekit-ftt")]


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
    venv.create(env_dir, with_pip=False)
    python = str(env_dir / "bin" / "python")
    # mergekit, torch & co. come from the environment running the tests, which may itself
    # be a virtualenv (system_site_packages would show the base interpreter's instead).
    # As plain path lines, the .pth files in those folders (an editable install of this
    # checkout) are not processed: only the wheel's .pth can register the method.
    nested_site = python_says(python, "import sysconfig; print(sysconfig.get_path('purelib'))")
    (Path(nested_site) / "outer_environment.pth").write_text("\n".join(outer_site_dirs()) + "\n")
    # --ignore-installed: pip sees the outer environment's mergekit-ftt through that .pth
    # and, where it is a regular install of the same version, would install nothing.
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--ignore-installed",
         "-q", str(wheel)],
        check=True, env=OFFLINE_ENV,
    )  # fmt: skip
    code = (
        "import mergekit_ftt; from mergekit.merge_methods import get;"
        f"print(mergekit_ftt.__file__.startswith({str(env_dir)!r}),"
        " get('finetuning_transfer').spec.name)"
    )
    # Without PYTHONPATH, so that a checkout on it cannot stand in for the wheel.
    assert python_says(python, code, PYTHONPATH=None) == "True finetuning_transfer"


def test_another_mergekit_release_gets_one_warning_and_the_method(tmp_path):
    """The installed mergekit's version as its metadata says (a dist-info ahead of the real
    one on the path): another release is warned about once, and the plugin still runs."""
    info = tmp_path / "mergekit-0.2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mergekit\nVersion: 0.2.0\n")
    registered, warnings = registered_with(tmp_path)
    assert registered == 1
    assert warnings == [
        "mergekit-ftt: warning: mergekit 0.2.0 is installed; mergekit-ftt extends the internals "
        "of mergekit==0.1.5, which another release may change. If a finetuning_transfer merge "
        "fails, install mergekit==0.1.5."
    ]
