"""The I/O floor of a three-model merge: read every input byte, write one model, no math.

Reads every ``*.safetensors`` byte of the given checkpoints in large blocks and writes the
target's shards to ``--output`` as it goes, so the output has exactly the size of a merged
model. Nothing is parsed or computed, so no merge tool streaming the same files can beat
its wall time on the same disk and page cache.

    python benchmarks/io_floor.py --inputs FT SB --target T --output OUT
"""

from __future__ import annotations

import argparse
from pathlib import Path

BLOCK_BYTES = 64 * 1024 * 1024


def copy_through(inputs: list[Path], target: Path, output: Path) -> int:
    """Read all shards of ``inputs`` and ``target``, write the target's; return bytes read."""
    output.mkdir(parents=True)
    buffer = bytearray(BLOCK_BYTES)
    view = memoryview(buffer)
    read = 0
    for folder in [*inputs, target]:
        for shard in sorted(folder.glob("*.safetensors")):
            sink = open(output / shard.name, "wb") if folder == target else None  # noqa: SIM115
            with open(shard, "rb", buffering=0) as source:
                while count := source.readinto(buffer):
                    read += count
                    if sink:
                        sink.write(view[:count])
            if sink:
                sink.close()
    return read


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=Path, nargs="+", required=True, help="non-target models")
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.output.exists():
        raise SystemExit(f"{args.output} exists; choose a new output folder")
    print(f"read {copy_through(args.inputs, args.target, args.output)} bytes")


if __name__ == "__main__":
    main()
