"""Decoding sign and sparse deltas: the compiled unpacker against the torch blocks it
replaced, side by side in one run.

For each delta folder given (made by ``ftt-delta extract --compress sign`` or
``magnitude``/``dare``), every tensor is decoded as a merge decodes it
(``mergekit_ftt.delta.encode.decode``), with numba (one pass into a buffer on huge pages)
and with ``jit=False`` (torch, block by block), round after round in turn, the files
already in the page cache: the cost of decoding, not of reading the disk. Every compiled
output is compared bit for bit with torch's. Medians (min–max) over the rounds of wall and
CPU throughput, in millions of decoded elements per second.

    python benchmarks/decode_speed.py DELTA [DELTA ...] --rounds 5

Writes ``benchmarks/results/decode-<date>-<HHMM>.{md,json}``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from harness import DEFAULT_RESULTS, command_line, rates, result_start, result_stem, write_result

from mergekit_ftt.delta.encode import decode
from mergekit_ftt.delta.format import DENSE, DeltaFolder

WAYS = {"compiled (numba)": True, "torch blocks (fallback)": False}


def decode_all(folder: DeltaFolder, jit: bool) -> tuple[float, float, dict[str, torch.Tensor]]:
    """(wall s, CPU s, tensors) of decoding every compressed tensor of ``folder``."""
    wall, cpu = time.perf_counter(), time.process_time()
    tensors = {
        name: decode(folder, name, jit=jit)
        for name in folder.tensor_names
        if DENSE not in folder.info(name).components
    }
    return time.perf_counter() - wall, time.process_time() - cpu, tensors


def measure(path: Path, rounds: int) -> dict:
    folder = DeltaFolder(path)
    _, _, reference = decode_all(folder, jit=False)  # reads the files into the page cache
    elements = sum(tensor.numel() for tensor in reference.values())
    samples: dict[str, list[tuple[float, float]]] = {way: [] for way in WAYS}
    decode_all(folder, jit=True)  # compiles (numba caches it on disk)
    for _ in range(rounds):
        for way, jit in WAYS.items():
            wall, cpu, tensors = decode_all(folder, jit)
            samples[way].append((wall, cpu))
            for name, tensor in tensors.items():
                if not torch.equal(tensor.view(torch.int16), reference[name].view(torch.int16)):
                    raise RuntimeError(f"{path}: {way} decodes {name} differently from torch")
            del tensors
    return {
        "delta": str(path),
        "encoding": folder.config.encoding.model_dump(exclude_none=True),
        "elements": elements,
        "ways": {
            way: {
                "wall_melem_s": rates(elements, [w for w, _ in values]),
                "cpu_melem_s": rates(elements, [c for _, c in values]),
            }
            for way, values in samples.items()
        },
    }


def render(result: dict) -> str:
    machine = result["machine"]
    lines = [
        f"# Decoding stored deltas, {result['started_utc']}",
        "",
        f"Machine: {machine['cpu_model']}, {machine['cores']} cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads); load average (1 min) "
        f"{result['load_average_start'][0]:.1f} at start, {result['load_average_end'][0]:.1f} "
        f"at end. Median (min–max) of {result['repeats']} rounds, files in the page cache; "
        "every compiled output equals torch's bit for bit.",
        "",
        "| delta | elements | way | wall Melem/s | CPU Melem/s | speed-up (wall) |",
        "|---|---|---|---|---|---|",
    ]
    for delta in result["deltas"]:
        encoding = delta["encoding"]
        name = f"{Path(delta['delta']).name} ({encoding['kind']}, {encoding['dtype']})"
        torch_wall = delta["ways"]["torch blocks (fallback)"]["wall_melem_s"]["median"]
        for way, row in delta["ways"].items():
            wall, cpu = row["wall_melem_s"], row["cpu_melem_s"]
            lines.append(
                f"| {name} | {delta['elements'] / 1e6:,.0f}M | {way} | "
                f"{wall['median']:,.0f} ({wall['min']:,.0f}–{wall['max']:,.0f}) | "
                f"{cpu['median']:,.0f} ({cpu['min']:,.0f}–{cpu['max']:,.0f}) | "
                f"{wall['median'] / torch_wall:.2f}× |"
            )
    return "\n".join(lines + command_line(result)) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("deltas", type=Path, nargs="+", help="sign or sparse delta folders")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = parser.parse_args()
    result = result_start("decode", args.rounds)
    result["deltas"] = [measure(path, args.rounds) for path in args.deltas]
    result["load_average_end"] = os.getloadavg()
    stem = result_stem(args.results, "decode", result["started_utc"])
    write_result(stem, result, render(result))
    print(render(result))
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
