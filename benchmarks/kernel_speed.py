"""The dense transfer kernel alone: elements per second against a plain memory copy.

Times ``_dense_transfer`` (one fine-tuned model, weight 1, bf16 in and out, the
benchmark checkpoints' statistics) on tensors already in memory, so nothing but the
arithmetic and its memory traffic is measured, next to ``out.copy_(target)`` of the
same bf16 tensor on one thread (the kernel runs on one thread). The kernel's default
chunk size and any others given run in turn, round after round; the table gives the
median and range over rounds of wall-clock and CPU (user + sys of the process)
throughput. CPU throughput is what the kernel costs; on a machine shared with other
jobs, wall-clock throughput also counts the time the kernel waited for a core.

    python benchmarks/kernel_speed.py --chunks 15,17,20

Writes ``benchmarks/results/kernel-<date>-<HHMM>.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))  # run from a checkout without installing

from bench_merge import machine_info  # noqa: E402

from mergekit_ftt.merge_methods import finetuning_transfer as kernel  # noqa: E402


def inputs(elements: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """target, source_base, source_finetuned with make_checkpoints.py's relative noise."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(elements, generator=generator) * 0.02
    target = (base + torch.randn(elements, generator=generator) * 0.002).bfloat16()
    finetuned = (base + torch.randn(elements, generator=generator) * 0.001).bfloat16()
    return target, base.bfloat16(), finetuned


def timed(work) -> tuple[tuple[float, float], object]:
    """((wall s, CPU s), result) of ``work()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return (time.perf_counter() - wall, time.process_time() - cpu), result


def measure(elements: int, chunks: list[int | None], rounds: int) -> dict:
    """Throughput of the memory copy and of the kernel at each chunk size (None: default)."""
    target, source_base, finetuned = inputs(elements)
    copy_out = torch.empty_like(target)

    def transfer() -> torch.Tensor:
        return kernel._dense_transfer(target, source_base, [finetuned], [1.0], torch.bfloat16)

    reference = transfer()
    default = kernel.CHUNK_ELEMENTS
    samples: dict[str, list[tuple[float, float]]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(rounds):
            sample, _ = timed(lambda: copy_out.copy_(target))
            samples.setdefault("memory copy (bf16 → bf16)", []).append(sample)
            for chunk in chunks:
                kernel.CHUNK_ELEMENTS = chunk or default
                sample, merged = timed(transfer)
                if not torch.equal(merged, reference):
                    raise RuntimeError(f"chunk {chunk}: output differs")
                key = f"kernel, chunk 2^{kernel.CHUNK_ELEMENTS.bit_length() - 1}"
                samples.setdefault(key + ("" if chunk else " (default)"), []).append(sample)
    finally:
        kernel.CHUNK_ELEMENTS = default
        torch.set_num_threads(threads)
    return {key: summarize(values, elements) for key, values in samples.items()}


def summarize(values: list[tuple[float, float]], elements: int) -> dict:
    def rates(seconds: list[float]) -> dict:
        per_second = sorted(elements / s / 1e6 for s in seconds)
        return {
            "median": statistics.median(per_second),
            "min": per_second[0],
            "max": per_second[-1],
        }

    return {
        "wall_melem_s": rates([w for w, _ in values]),
        "cpu_melem_s": rates([c for _, c in values]),
        "cores_used": statistics.median(c / w for w, c in values),
    }


def render(result: dict) -> str:
    lines = [
        f"# Kernel speed, {result['started_utc']}",
        "",
        f"{result['elements'] / 1e6:.0f}M bf16 elements, one fine-tuned model, weight 1, one "
        f"thread; median (min–max) of {result['rounds']} rounds, Melem/s. Machine: "
        f"{result['machine']['cpu_model']}, {result['machine']['cores']} cores, torch "
        f"{result['machine']['torch']}; load average (1 min) "
        f"{result['load_average_start'][0]:.1f} → {result['load_average_end'][0]:.1f}.",
        "",
        "| | wall Melem/s | CPU Melem/s | cores used (CPU ÷ wall) | CPU ÷ memory copy |",
        "|---|---|---|---|---|",
    ]
    settings = result["settings"]
    copy = next(row for key, row in settings.items() if key.startswith("memory copy"))
    for key, row in settings.items():
        wall, cpu = row["wall_melem_s"], row["cpu_melem_s"]
        ratio = cpu["median"] / copy["cpu_melem_s"]["median"]
        lines.append(
            f"| {key} | {wall['median']:.0f} ({wall['min']:.0f}–{wall['max']:.0f}) | "
            f"{cpu['median']:.0f} ({cpu['min']:.0f}–{cpu['max']:.0f}) | "
            f"{row['cores_used']:.2f} | "
            + ("– |" if key.startswith("memory copy") else f"{ratio:.3f} |")
        )
    lines += ["", f"Command: `{result['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, default=1 << 25)
    parser.add_argument(
        "--chunks",
        default="",
        help="comma-separated log2 of chunk sizes to try besides the kernel's default",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc)
    result = {
        "started_utc": started.isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "machine": machine_info(),
        "load_average_start": os.getloadavg(),
        "elements": args.elements,
        "rounds": args.rounds,
    }
    chunks = [None, *(1 << int(n) for n in args.chunks.split(",") if n)]
    result["settings"] = measure(args.elements, chunks, args.rounds)
    result["load_average_end"] = os.getloadavg()
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"kernel-{started:%Y-%m-%d-%H%M}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
