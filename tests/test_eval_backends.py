"""Backend argument translation, the missing-vLLM message and the OLMES command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from mergekit_ftt.errors import FttError
from mergekit_ftt.eval import BackendOptions, BackendUnavailable, ModelSpec, backends, olmes
from mergekit_ftt.eval.suites import load_suite

REPO = Path(__file__).resolve().parents[1]


def test_hf_on_a_cpu_machine_runs_float32_on_cpu():
    args = backends.model_args("hf", "/m", BackendOptions(add_bos_token=True), cuda=False)
    assert args == {
        "pretrained": "/m",
        "trust_remote_code": False,
        "add_bos_token": True,
        "device": "cpu",
        "dtype": "float32",
    }
    assert backends.batch_size("hf", BackendOptions()) == 1


def test_hf_on_cuda_keeps_the_checkpoint_dtype_and_maps_max_model_len():
    args = backends.model_args("hf", "/m", BackendOptions(max_model_len=4096), cuda=True)
    assert args == {
        "pretrained": "/m",
        "trust_remote_code": False,
        "device": "cuda",
        "dtype": "auto",
        "max_length": 4096,
    }


def test_vllm_gets_parallelism_memory_and_seed_not_device():
    options = BackendOptions(
        device="cpu",
        tensor_parallel_size=2,
        data_parallel_size=4,
        gpu_memory_utilization=0.8,
        max_model_len=8192,
        add_bos_token=True,
        seed=42,
    )
    assert backends.model_args("vllm", "meta-llama/Llama-3.1-8B", options, cuda=True) == {
        "pretrained": "meta-llama/Llama-3.1-8B",
        "trust_remote_code": False,
        "add_bos_token": True,
        "dtype": "auto",
        "tensor_parallel_size": 2,
        "data_parallel_size": 4,
        "gpu_memory_utilization": 0.8,
        "seed": 42,
        "max_model_len": 8192,
    }
    assert backends.batch_size("vllm", options) == "auto"
    assert backends.batch_size("vllm", BackendOptions(batch_size=64)) == 64


def test_model_args_pass_through_last_in_lm_evals_forms():
    options = BackendOptions(device="cuda:1", model_args="max_length=64,dtype=bfloat16")
    assert backends.model_args("hf", "/m", options, cuda=True) == {
        "pretrained": "/m",
        "trust_remote_code": False,
        "device": "cuda:1",
        "dtype": "bfloat16",  # --model_args wins over --dtype's default
        "max_length": 64,
    }
    as_json = BackendOptions(model_args='{"enforce_eager": true, "max_num_seqs": 8}')
    assert as_json.model_args == {"enforce_eager": True, "max_num_seqs": 8}
    several = BackendOptions(model_args=["a=1,b=x", "c=true"])
    assert several.model_args == {"a": 1, "b": "x", "c": True}


def test_unknown_backend_is_refused():
    with pytest.raises(FttError, match="unknown backend 'sglang'"):
        backends.require_backend("sglang")


@pytest.mark.skipif(find_spec("vllm") is not None, reason="vLLM is installed here")
def test_asking_for_vllm_without_it_says_what_to_install(tmp_path):
    with pytest.raises(BackendUnavailable, match=r"pip install 'mergekit-ftt\[vllm\]'"):
        backends.require_backend("vllm")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mergekit_ftt.eval.cli",
            "run",
            "--model",
            f"m={tmp_path}",
            "--tasks",
            "ifeval",
            "--backend",
            "vllm",
            "--output",
            str(tmp_path / "out"),
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "ftt-eval: error: the vllm backend needs vLLM" in done.stderr
    assert "pip install 'mergekit-ftt[vllm]'" in done.stderr


def test_olmes_command_line():
    suite = load_suite("olmes-instruct")
    options = BackendOptions(max_model_len=4096)
    argv = olmes.olmes_command(
        ModelSpec("m5+d4", "/ckpt/m5-d4"),
        "gsm8k::tulu",
        Path("/out/gsm8k__tulu"),
        suite,
        options,
        gpus=2,
        limit=100,
    )
    assert argv == [
        "olmes",
        "--model",
        "/ckpt/m5-d4",
        "--model-type",
        "vllm",
        "--gpus",
        "2",
        "--model-args",
        json.dumps(
            {"add_bos_token": True, "dtype": "bfloat16", "max_length": 4096}, sort_keys=True
        ),
        "--task",
        "gsm8k::tulu",
        "--output-dir",
        "/out/gsm8k__tulu",
        "--limit",
        "100",
    ]
    assert olmes.task_folder("mmlu:0shot_cot::tulu3") == "mmlu__0shot_cot__tulu3"


def test_olmes_suite_maps_every_column():
    suite = load_suite("olmes-instruct")
    assert sorted(suite.olmes_tasks) == sorted(c.name for c in suite.columns)
    assert suite.olmes_tasks["GSM8K"] == "gsm8k::tulu"


def test_via_olmes_without_olmes_on_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(olmes.OlmesUnavailable, match="`olmes` command is not on PATH"):
        olmes.run_suite([ModelSpec("m", "/m")], "olmes-instruct", tmp_path, BackendOptions())
