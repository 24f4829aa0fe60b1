"""Delegate a suite to AI2's ``olmes`` CLI when it is installed (it is not on PyPI).

OLMES pins lm-eval 0.4.3, transformers < 5 and vLLM 0.11, so it lives in its own
environment; this module only builds its command lines and runs them. Results stay
in OLMES's own format under ``<output>/<label>/olmes/<task>/``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from mergekit_ftt.errors import FttError
from mergekit_ftt.eval.options import BackendOptions
from mergekit_ftt.eval.runner import ModelSpec
from mergekit_ftt.eval.suites import Suite, load_suite

OLMES_HINT = (
    "the `olmes` command is not on PATH. Install OLMES from https://github.com/allenai/olmes "
    "in a separate environment (it pins lm-eval 0.4.3, transformers<5, vLLM 0.11) and put "
    "its bin folder on PATH, or drop --via-olmes to use the OLMES-equivalent lm-eval suites."
)


class OlmesUnavailable(FttError):
    """``olmes`` is not installed, or the suite has no OLMES task ids."""


def olmes_command(
    model: ModelSpec,
    task: str,
    output_dir: Path,
    suite: Suite,
    options: BackendOptions,
    gpus: int = 1,
    limit: float | None = None,
) -> list[str]:
    """The argv of one OLMES run of ``task`` (an OLMES task id such as ``gsm8k::tulu``)."""
    model_args = {**suite.model_args, "dtype": options.dtype or "bfloat16"}
    if options.add_bos_token is not None:
        model_args["add_bos_token"] = options.add_bos_token
    if options.max_model_len is not None:
        model_args["max_length"] = options.max_model_len
    if options.trust_remote_code:
        model_args["trust_remote_code"] = True
    argv = [
        "olmes",
        "--model",
        model.pretrained,
        "--model-type",
        "vllm",
        "--gpus",
        str(gpus),
        "--model-args",
        json.dumps(model_args, sort_keys=True),
        "--task",
        task,
        "--output-dir",
        str(output_dir),
    ]
    if limit is not None:
        argv += ["--limit", str(limit)]
    return argv


def task_folder(task: str) -> str:
    """A folder name for an OLMES task id (``gsm8k::tulu`` -> ``gsm8k__tulu``)."""
    return re.sub(r"[^\w.-]+", "__", task)


def run_suite(
    models: Sequence[ModelSpec],
    suite_name: str,
    output: str | Path,
    options: BackendOptions,
    gpus: int = 1,
    limit: float | None = None,
    include_path: Sequence[str | Path] = (),
) -> None:
    """Run every OLMES task id of the suite on every model, one ``olmes`` call each."""
    suite = load_suite(suite_name, include_path)
    if not suite.olmes_tasks:
        raise OlmesUnavailable(
            f"suite {suite_name!r} names no OLMES tasks (metadata.ftt.olmes_tasks)"
        )
    if shutil.which("olmes") is None:
        raise OlmesUnavailable(OLMES_HINT)
    for model in models:
        for task in suite.olmes_tasks.values():
            folder = Path(output) / model.label / "olmes" / task_folder(task)
            folder.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                olmes_command(model, task, folder, suite, options, gpus, limit), check=True
            )
