"""The dense transfer kernel alone: elements per second against a plain memory copy.

Times ``_dense_transfer`` (one fine-tuned model, weight 1, bf16 in and out, the
benchmark checkpoints' statistics) on tensors already in memory, so nothing but the
arithmetic and its memory traffic is measured, next to ``out.copy_(target)`` of the
same bf16 tensor. Settings (torch threads × chunk elements) run in turn, round after
round; the table gives the median and the range over rounds of wall-clock and CPU
(user + sys of the process) throughput. CPU throughput is what the kernel costs; on a
machine shared with other jobs, wall-clock throughput also counts the time the kernel
waited for a core.

    python benchmarks/kernel_speed.py --threads 1,2 --chunks 15,17,20

Writes ``benchmarks/results/kernel-<date>.{md,json}``.
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


def measure(elements: int, threads: list[int], chunks: list[int | None], rounds: int) -> dict:
    """Throughput of each (threads, chunk) setting; chunk None: the kernel's defaults."""
    target, source_base, finetuned = inputs(elements)
    copy_out = torch.empty_like(target)

    def transfer() -> torch.Tensor:
        return kernel._dense_transfer(target, source_base, [finetuned], [1.0], torch.bfloat16)

    reference = transfer()
    settings = [("memcpy", n, None) for n in threads] + [
        ("kernel", n, chunk) for n in threads for chunk in chunks
    ]
    samples: dict[str, list[tuple[float, float]]] = {}
    defaults = kernel.CHUNK_ELEMENTS, kernel.SINGLE_THREAD_CHUNK_ELEMENTS
    try:
        for _ in range(rounds):
            for name, thread_count, chunk in settings:
                torch.set_num_threads(thread_count)
                if name == "memcpy":
                    sample, _ = timed(lambda: copy_out.copy_(target))
                    key = f"memcpy, {thread_count} thread(s)"
                else:
                    sizes = (chunk, chunk) if chunk else defaults
                    kernel.CHUNK_ELEMENTS, kernel.SINGLE_THREAD_CHUNK_ELEMENTS = sizes
                    sample, merged = timed(transfer)
                    if not torch.equal(merged, reference):
                        raise RuntimeError(f"chunk {chunk}: output differs")
                    size = kernel._threads_and_chunk(target.device)[1]
                    key = f"kernel, {thread_count} thread(s), chunk 2^{size.bit_length() - 1}"
                    key += "" if chunk else " (default)"
                samples.setdefault(key, []).append(sample)
    finally:
        kernel.CHUNK_ELEMENTS, kernel.SINGLE_THREAD_CHUNK_ELEMENTS = defaults
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
        f"{result['elements'] / 1e6:.0f}M bf16 elements, one fine-tuned model, weight 1, "
        f"median (min–max) of {result['rounds']} rounds, Melem/s. Machine: "
        f"{result['machine']['cpu_model']}, {result['machine']['cores']} cores, torch "
        f"{result['machine']['torch']}; load average (1 min) "
        f"{result['load_average_start'][0]:.1f} → {result['load_average_end'][0]:.1f}.",
        "",
        "| setting | wall Melem/s | CPU Melem/s | cores used (CPU ÷ wall) | CPU ÷ memcpy CPU |",
        "|---|---|---|---|---|",
    ]
    copies = {
        key.split(", ")[1]: row["cpu_melem_s"]["median"]
        for key, row in result["settings"].items()
        if key.startswith("memcpy")
    }
    for key, row in result["settings"].items():
        wall, cpu = row["wall_melem_s"], row["cpu_melem_s"]
        ratio = cpu["median"] / copies[key.split(", ")[1]]
        lines.append(
            f"| {key} | {wall['median']:.0f} ({wall['min']:.0f}–{wall['max']:.0f}) | "
            f"{cpu['median']:.0f} ({cpu['min']:.0f}–{cpu['max']:.0f}) | "
            f"{row['cores_used']:.2f} | "
            + ("– |" if key.startswith("memcpy") else f"{ratio:.3f} |")
        )
    lines += ["", f"Command: `{result['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, default=1 << 25)
    parser.add_argument("--threads", default="1", help="comma-separated torch thread counts")
    parser.add_argument(
        "--chunks",
        default="",
        help="comma-separated log2 of the chunk sizes to try besides the kernel's defaults",
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
    result["settings"] = measure(
        args.elements,
        [int(n) for n in args.threads.split(",")],
        [None, *(1 << int(n) for n in args.chunks.split(",") if n)],
        args.rounds,
    )
    result["load_average_end"] = os.getloadavg()
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"kernel-{started:%Y-%m-%d-%H%M}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
