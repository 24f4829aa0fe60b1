"""One prepared GPU check: merge timing (CPU vs --cuda), TRL SFT and lm-eval on CUDA.

Runs every stage through the commands a user types (as ``python -m`` modules, since the
device machine gets the dependencies as wheels in a ``--target`` folder where ``.pth``
files do not run: this also exercises the ``python -m mergekit_ftt`` fallback). Each
stage is timed and its outcome written to ``OUT/gpu_smoke.json``; a failing stage is
recorded and the next one still runs.

    python benchmarks/gpu_smoke.py --out results/ --size 1b        # on a GPU machine
    python benchmarks/gpu_smoke.py --out /tmp/x --size tiny --cpu-only   # dry run on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from bench_merge import Inputs, task_arithmetic_config, transfer_config
from harness import rounded_once

from mergekit_ftt.tiny import build_tokenizer, tiny_config, tiny_config_for

REPO = Path(__file__).resolve().parents[1]
# Llama 3.2 1B shapes (tied embeddings, 128256 vocabulary), or a tiny stand-in.
SIZES = {
    "1b": dict(
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=512),
}


def run(command: list[str], log: Path, timeout: int = 300, cwd: Path = REPO) -> dict:
    start = time.perf_counter()
    with log.open("a") as stream:
        stream.write(f"\n$ {' '.join(command)}\n")
        stream.flush()
        try:
            code = subprocess.run(
                command, cwd=cwd, stdout=stream, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    return {
        "command": " ".join(command),
        "rc": code,
        "wall_s": round(time.perf_counter() - start, 2),
    }


def make_checkpoints(root: Path, size: str, device: str) -> dict[str, Path]:
    """source_base random; finetuned and target are seeded perturbations of it (bf16)."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(["fine-tuning transfer on a GPU"] * 10, vocab_size=300)
    config = tiny_config("llama", **SIZES[size])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    paths = {}
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for name, noise in (("source_base", 0.0), ("source_finetuned", 0.01), ("target", 0.02)):
        generator = torch.Generator(device=device).manual_seed(len(name))
        with torch.no_grad():
            for key, tensor in model.state_dict().items():
                perturbation = torch.randn(tensor.shape, generator=generator, device=device)
                tensor.copy_(original[key].float() + noise * perturbation)
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


def recipes(paths: dict[str, Path], root: Path) -> dict[str, Path]:
    """The two recipes of ``bench_merge.py``: the transfer and its task_arithmetic twin."""
    inputs = Inputs(paths["target"], paths["source_finetuned"], paths["source_base"])
    written = {}
    for name, recipe in (
        ("transfer", transfer_config(inputs)),
        ("task_arithmetic", task_arithmetic_config(inputs)),
    ):
        written[name] = root / f"{name}.yml"
        written[name].write_text(yaml.safe_dump(recipe))
    return written


def merges(recipe_paths: dict[str, Path], root: Path, log: Path, cpu_only: bool, repeats: int):
    variants = [("transfer", "cpu", [])]
    if not cpu_only:
        variants += [
            ("transfer", "cuda", ["--cuda"]),
            ("transfer", "gpu-rich", ["--gpu-rich"]),
            ("task_arithmetic", "cuda", ["--cuda"]),
        ]
    results = []
    for repeat in range(repeats):  # alternate the variants, repeat the round
        for recipe, label, flags in variants:
            out = root / f"out-{recipe}-{label}-{repeat}"
            command = [
                sys.executable,
                "-m",
                "mergekit_ftt",
                "yaml",
                str(recipe_paths[recipe]),
                str(out),
                "--quiet",
                *flags,
            ]
            results.append({"variant": f"{recipe} {label}", **run(command, log)})
    return results


def compare_outputs(root: Path, paths: dict[str, Path]) -> dict:
    """CPU and GPU transfers bit-identical, and both equal the float64 reference."""
    from safetensors.torch import load_file

    def weights(folder: Path) -> dict[str, torch.Tensor]:
        merged = {}
        for shard in sorted(folder.glob("*.safetensors")):
            merged.update(load_file(shard))
        return merged

    outputs = {
        label: weights(root / f"out-transfer-{label}-0")
        for label in ("cpu", "cuda", "gpu-rich")
        if (root / f"out-transfer-{label}-0").exists()
    }
    target, finetuned, base = (
        weights(paths[name]) for name in ("target", "source_finetuned", "source_base")
    )
    report = {}
    for label, merged in outputs.items():
        # Rounded once by the NumPy reference: ``.to(bfloat16)`` from float64 goes through
        # float32 and rounds twice, which made false mismatches at 1b.
        exact = all(
            torch.equal(
                tensor,
                rounded_once(
                    target[name].double() + (finetuned[name].double() - base[name].double()),
                    tensor.dtype,
                ).reshape(tensor.shape),
            )
            for name, tensor in merged.items()
        )
        report[f"{label}_equals_float64_reference"] = exact
    if "cuda" in outputs and "cpu" in outputs:
        report["cuda_equals_cpu"] = all(
            torch.equal(outputs["cpu"][n], outputs["cuda"][n]) for n in outputs["cpu"]
        )
    return report


def training(root: Path, log: Path, cpu_only: bool) -> list[dict]:
    smoke = root / "smoke"
    # The shipped CPU smoke config, with this run's model and data.
    config = root / "smoke.yaml"
    data = {"path": "json", "data_files": str(smoke / "train.jsonl"), "columns": ["messages"]}
    config.write_text(json.dumps({"include": "cpu_smoke", "datasets": [data]}))
    common = ["--model_name_or_path", str(smoke / "base")]
    steps = [run([sys.executable, "-m", "mergekit_ftt.training.smoke", str(smoke)], log)]
    gpu = [] if cpu_only else ["--use_cpu", "false", "--bf16", "true"]
    steps.append(
        run(
            [
                sys.executable,
                "-m",
                "mergekit_ftt.training.sft",
                "--config",
                str(config),
                *common,
                "--output_dir",
                str(smoke / "ft"),
                *gpu,
            ],
            log,
        )
    )
    if not cpu_only:
        fsdp = "training/accelerate/fsdp.yaml"
        launch = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            fsdp,
            "--num_processes",
            "1",
        ]
        steps.append(
            run(
                [
                    *launch,
                    "-m",
                    "mergekit_ftt.training.sft",
                    "--config",
                    str(config),
                    *common,
                    "--output_dir",
                    str(smoke / "ft_fsdp"),
                    "--max_steps",
                    "10",
                    *gpu,
                ],
                log,
            )
        )
    return steps


def evaluation(root: Path, log: Path, cpu_only: bool) -> dict:
    from mergekit_ftt.tiny import save_random_model

    tokenizer = build_tokenizer(
        [f"the sum of {a} and {b} is {a + b}." for a in range(20) for b in range(20)],
        vocab_size=200,
    )
    config = tiny_config_for(tokenizer, "llama")
    model = save_random_model(config, root / "eval-model", seed=0, tokenizer=tokenizer)
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    rows = [
        {"question": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1)], "label": 0}
        for a in range(10)
        for b in range(10)
    ]
    (tasks / "sums.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tasks / "gpu_sums.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "gpu_sums",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(tasks / "sums.jsonl")}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": "{{question}}",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "label",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
                "metadata": {"version": 1.0},
            }
        )
    )
    device = "cpu" if cpu_only else "cuda"
    code = "import sys; from mergekit_ftt.eval.cli import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", code, "run", "--model", f"tiny={model}", "--tasks", "gpu_sums", "--include-path", str(tasks),
               "--output", str(root / "eval-results"), "--backend", "hf", "--device", device, "--batch-size", "16"]  # fmt: skip
    vllm = [sys.executable, "-c", code, "run", "--model", f"tiny={model}", "--tasks", "gpu_sums", "--include-path", str(tasks),
            "--output", str(root / "eval-vllm"), "--backend", "vllm"]  # fmt: skip
    return {"hf": run(command, log), "vllm_without_vllm_installed": run(vllm, log)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ftt-gpu-smoke"))
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cpu-only", action="store_true", help="dry run without a GPU")
    parser.add_argument(
        "--stages",
        default="merge,training,eval",
        help="comma-separated: merge (timings and the bit-for-bit check), training, eval; "
        "training needs trl and eval lm-eval on the machine",
    )
    args = parser.parse_args()
    stages = set(args.stages.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.out / "gpu_smoke.log"
    device = "cpu" if args.cpu_only else "cuda"
    report: dict = {
        "machine": {
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "size": args.size,
    }
    if "merge" in stages:
        start = time.perf_counter()
        paths = make_checkpoints(args.work / "checkpoints", args.size, device)
        report["make_checkpoints_s"] = round(time.perf_counter() - start, 1)
        report["merges"] = merges(
            recipes(paths, args.work), args.work, log, args.cpu_only, args.repeats
        )
        report["outputs"] = compare_outputs(args.work, paths)
        (args.out / "gpu_smoke.json").write_text(json.dumps(report, indent=2))
    if "training" in stages:
        report["training"] = training(args.work, log, args.cpu_only)
        (args.out / "gpu_smoke.json").write_text(json.dumps(report, indent=2))
    if "eval" in stages:
        report["eval"] = evaluation(args.work, log, args.cpu_only)
        (args.out / "gpu_smoke.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
