"""The dense transfer kernel alone, side by side with a plain bf16 copy, in one run.

On tensors already in memory (bf16, the benchmark checkpoints' statistics), round after
round in turn: ``out.copy_(target)`` of the same tensor (the memory floor), the fused
kernel with weight 1 (float32, each operation checked exact; float64 for a chunk where one
was not) and with weight 0.7 (float64 FMA and its exact error), each on 1 and on
``--threads`` threads, the compiled loop alone into a reused output, the memory ceiling of
its access pattern (a compiled loop reading three bf16 arrays and writing one, with one
XOR per element: what the loop would reach with free arithmetic), and the torch kernel
(the fallback) on one thread. Every transfer output is compared bit for bit with the
torch kernel's (weight 1, where float64 is exact on these inputs). Medians and ranges over the rounds of
wall-clock and CPU throughput: CPU throughput is what the kernel costs; on a machine
shared with other jobs, wall-clock throughput also counts waiting for a core.

    python benchmarks/kernel_speed.py --rounds 5

Writes ``benchmarks/results/kernel-<date>-<HHMM>.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from harness import DEFAULT_RESULTS, command_line, machine_info, rates, write_result
from numba import njit

from mergekit_ftt.merge_methods import kernel
from mergekit_ftt.merge_methods.cpu import as_bits, compiled


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


@njit(nogil=True, cache=True)
def _three_reads_one_write(out, a, b, c):
    """The fused loop's memory traffic without its arithmetic (unsigned indices, as in
    ``jit.transfer``, so that numba vectorises the loop)."""
    for i in range(np.uint64(len(out))):
        out[i] = a[i] ^ b[i] ^ c[i]


def variants(target, source_base, finetuned, threads: int) -> dict:
    """label -> (torch threads, work). The fused kernel takes torch's thread count."""
    copy_out = torch.empty_like(target)

    def fused(weight):
        return lambda: kernel.dense_transfer(
            target, source_base, [finetuned], [weight], torch.bfloat16
        )

    def torch_kernel():
        return kernel.dense_transfer(
            target, source_base, [finetuned], [1.0], torch.bfloat16, jit=False
        )

    # The compiled loop alone, into an output reused round after round: the difference to
    # the row above it is the fresh output's allocation and first touch.
    loop_out = torch.empty_like(target)
    jit = compiled()
    loop_arrays = (
        *(as_bits(t) for t in (loop_out, target)),
        (as_bits(finetuned),),
        as_bits(source_base),
        np.array([True]),
        np.array([1.0]),
        False,
        True,  # bf16 inputs, weight 1: float32 first
    )

    def loop():
        jit.transfer(*loop_arrays, 0, target.numel())
        return loop_out

    def ceiling():
        _three_reads_one_write(*(as_bits(t) for t in (loop_out, target, finetuned, source_base)))

    table = {"bf16 copy, 1 thread": (1, lambda: copy_out.copy_(target))}
    for count in sorted({1, threads}):
        table[f"fused, weight 1, {count} thread(s)"] = (count, fused(1.0))
        table[f"fused, weight 0.7, {count} thread(s)"] = (count, fused(0.7))
    table["fused loop alone, output reused, weight 1, 1 thread"] = (1, loop)
    table["memory ceiling: 3 reads, 1 write, no arithmetic, 1 thread"] = (1, ceiling)
    table["torch kernel (fallback), weight 1, 1 thread"] = (1, torch_kernel)
    return table


def measure(elements: int, rounds: int, threads: int) -> dict:
    target, source_base, finetuned = inputs(elements)
    table = variants(target, source_base, finetuned, threads)
    reference = kernel.dense_transfer(
        target, source_base, [finetuned], [1.0], torch.bfloat16, jit=False
    )
    for _, work in table.values():  # compile (numba caches it on disk) and warm up
        work()
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label in table}
    before = torch.get_num_threads()
    try:
        for _ in range(rounds):
            for label, (count, work) in table.items():
                torch.set_num_threads(count)
                sample, result = timed(work)
                samples[label].append(sample)
                if "weight 1" in label and not torch.equal(result, reference):
                    raise RuntimeError(f"{label}: output differs from the torch kernel's")
    finally:
        torch.set_num_threads(before)
    return {
        label: {
            "wall_melem_s": rates(elements, [w for w, _ in values]),
            "cpu_melem_s": rates(elements, [c for _, c in values]),
            "cores_used": statistics.median(c / w for w, c in values),
        }
        for label, values in samples.items()
    }


def render(result: dict) -> str:
    lines = [
        f"# Kernel speed, {result['started_utc']}",
        "",
        f"{result['elements'] / 1e6:.0f}M bf16 elements, one fine-tuned model, bf16 out; "
        f"median (min–max) of {result['rounds']} rounds, Melem/s, all rows in turn in one "
        f"run. Machine: {result['machine']['cpu_model']}, {result['machine']['cores']} cores, "
        f"torch {result['machine']['torch']}, numba {result['numba']}; shared with other "
        f"jobs: load average (1 min) {result['load_average_start'][0]:.1f} at start, "
        f"{result['load_average_end'][0]:.1f} at end.",
        "",
        "| | wall Melem/s | CPU Melem/s | cores used (CPU ÷ wall) | CPU ÷ bf16 copy |",
        "|---|---|---|---|---|",
    ]
    settings = result["settings"]
    copy = settings["bf16 copy, 1 thread"]["cpu_melem_s"]["median"]
    for key, row in settings.items():
        wall, cpu = row["wall_melem_s"], row["cpu_melem_s"]
        lines.append(
            f"| {key} | {wall['median']:.0f} ({wall['min']:.0f}–{wall['max']:.0f}) | "
            f"{cpu['median']:.0f} ({cpu['min']:.0f}–{cpu['max']:.0f}) | "
            f"{row['cores_used']:.2f} | {cpu['median'] / copy:.2f} |"
        )
    lines += command_line(result)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from importlib.metadata import version

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, default=1 << 25)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc)
    result = {
        "started_utc": started.isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "machine": machine_info(),
        "numba": version("numba"),
        "load_average_start": os.getloadavg(),
        "elements": args.elements,
        "rounds": args.rounds,
    }
    result["settings"] = measure(args.elements, args.rounds, args.threads)
    result["load_average_end"] = os.getloadavg()
    write_result(args.results / f"kernel-{started:%Y-%m-%d-%H%M}", result, render(result))
    print(render(result))


if __name__ == "__main__":
    main()
