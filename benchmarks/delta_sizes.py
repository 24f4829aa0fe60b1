"""Size of a delta folder in each format, from a model's tensor shapes alone (no weights).

Every component's size follows from the shapes (see mergekit_ftt/delta/format.py), except
the number of exact corrections, which depends on the weights: it is taken as a measured
fraction of the elements (``--corrections``, default: the 350m benchmark's), and those rows
are marked as estimates. ``--check DELTA_DIR`` compares the arithmetic with a real folder.

    python benchmarks/delta_sizes.py llama3-8b
    python benchmarks/delta_sizes.py 350m --check /path/to/350m-delta
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

from make_checkpoints import SIZES, tensor_shapes  # noqa: E402

from mergekit_ftt.delta.encode import SPARSIFY_BLOCK_ELEMENTS, rows_per_block  # noqa: E402
from mergekit_ftt.tiny import tiny_config  # noqa: E402

GB = 1000**3
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
# Measured on the 350m benchmark checkpoints (bf16 fine-tune = base + noise of 5% of the
# weights' scale): elements whose ft − base is not a bf16 / float32 value.
MEASURED = {"bfloat16": 0.027025, "float32": 1.69e-7}


def dense(shape, dtype: str, corrections: float = 0.0) -> float:
    n = math.prod(shape)
    index = 4 if n < 2**31 else 8
    return n * ITEMSIZE[dtype] + corrections * n * (index + 4)


def sparse(shape, dtype: str, density: float, exact_count: bool) -> float:
    n = math.prod(shape)
    if not exact_count:  # DARE keeps each element with probability `density`
        return math.ceil(n / 8) + density * n * ITEMSIZE[dtype]
    rows, row = (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (n, 1)
    step = rows_per_block(row, SPARSIFY_BLOCK_ELEMENTS)
    kept = sum(
        max(1, int(density * min(step, rows - start) * row)) for start in range(0, rows, step)
    )
    return math.ceil(n / 8) + kept * ITEMSIZE[dtype]


def sign(shape, dtype: str, scale: str) -> float:
    if len(shape) < 2:
        return dense(shape, dtype)
    return math.ceil(math.prod(shape) / 8) + 4 * (shape[0] if scale == "row" else 1)


def formats(corrections: dict[str, float]) -> dict:
    return {
        "dense float32, exact": lambda s: dense(s, "float32", corrections["float32"]),
        "dense bfloat16, exact": lambda s: dense(s, "bfloat16", corrections["bfloat16"]),
        "dense bfloat16, rounded": lambda s: dense(s, "bfloat16"),
        "magnitude 30%, bf16 values": lambda s: sparse(s, "bfloat16", 0.3, True),
        "magnitude 10%, bf16 values": lambda s: sparse(s, "bfloat16", 0.1, True),
        "DARE 10%, bf16 values": lambda s: sparse(s, "bfloat16", 0.1, False),
        "sign, row scales": lambda s: sign(s, "bfloat16", "row"),
        "sign, matrix scales": lambda s: sign(s, "bfloat16", "matrix"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("size", choices=sorted(SIZES))
    parser.add_argument(
        "--corrections", type=json.loads, default=MEASURED,
        help='fraction of elements stored exactly, per dtype (JSON; default: %(default)s)',
    )  # fmt: skip
    parser.add_argument("--check", type=Path, help="a delta folder of this size to compare with")
    args = parser.parse_args(argv)
    spec = SIZES[args.size]
    shapes = [shape for _, shape in tensor_shapes(tiny_config(spec.architecture, **spec.config))]
    elements = sum(math.prod(s) for s in shapes)
    model_bytes = 2 * elements
    print(f"{args.size}: {len(shapes)} tensors, {elements:,} elements; a bf16 model is "
          f"{model_bytes / GB:.2f} GB\n")  # fmt: skip
    print("| format | GB | bytes per element | ÷ bf16 model |")
    print("|---|---:|---:|---:|")
    for name, size in formats(args.corrections).items():
        total = sum(size(s) for s in shapes)
        estimate = " (estimate)" if "exact" in name else ""
        print(f"| {name}{estimate} | {total / GB:.2f} | {total / elements:.3f} | "
              f"{total / model_bytes:.3f} |")  # fmt: skip
    if args.check:
        config = json.loads((args.check / "delta_config.json").read_text())
        encoding = config["encoding"]
        actual = sum(f["size"] for f in config["files"].values())
        fraction = sum(t["corrections"] for t in config["tensors"].values()) / elements
        print(f"\n{args.check}: {encoding}, {actual / GB:.4f} GB on disk, corrections "
              f"{fraction:.6f} of the elements")  # fmt: skip


if __name__ == "__main__":
    main()
