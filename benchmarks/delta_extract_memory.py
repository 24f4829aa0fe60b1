"""Peak memory of ``ftt-delta extract`` on the largest tensors of an 8B model, without 8B checkpoints.

Extraction holds one tensor's encoded output, one shard being filled (at most
``--shard-size``, 1 GB) and one block of float64 scratch, so its peak is set by the
largest tensor. ``llama3-8b-1layer`` has Meta-Llama-3-8B's vocabulary and widths (the
128256 × 4096 embedding and lm_head, 525M elements each) and one decoder layer: 3 × 2.4 GB
of checkpoints instead of 3 × 16 GB. Each format is extracted once, in a fresh process
measured by bench_merge.py's sampler (anonymous memory: the mapped input shards are
file-backed page cache and count only in RSS).

    python benchmarks/delta_extract_memory.py --out /work/ckpt/delta
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import make_checkpoints  # noqa: E402
from bench_merge import measure  # noqa: E402
from harness import DEFAULT_RESULTS, GB, machine_info, write_result  # noqa: E402

SIZE = "llama3-8b-1layer"
FORMATS = {
    "bf16 exact": [],
    "float32 exact": ["--dtype", "float32"],
    "sign, row scales": ["--compress", "sign"],
    "magnitude 10%": ["--compress", "magnitude", "--density", "0.1"],
    "DARE 10%": ["--compress", "dare", "--density", "0.1"],
}


def one_layer_8b() -> make_checkpoints.SizeSpec:
    spec = make_checkpoints.SIZES["llama3-8b"]
    return make_checkpoints.SizeSpec(
        spec.architecture,
        {**spec.config, "num_layers": 1},
        shard_bytes=spec.shard_bytes,
        extra_vocab=False,
        note="llama3-8b's vocabulary and widths, one decoder layer",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=make_checkpoints.DEFAULT_OUT)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    make_checkpoints.SIZES[SIZE] = one_layer_8b()
    root = args.out / SIZE
    if not (root / "source_base" / "config.json").exists():
        make_checkpoints.build_checkpoints(SIZE, args.out, extra_vocab=False)
    work = root / "extract"
    work.mkdir(exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    result = {"started_utc": started, "machine": machine_info(), "load": os.getloadavg()}
    rows = {}
    for name, options in FORMATS.items():
        out = work / "".join(c if c.isalnum() else "-" for c in name)
        command = [
            "ftt-delta", "extract", str(out), "--overwrite",
            "--finetuned", str(root / "source_finetuned"), "--base", str(root / "source_base"),
            *options,
        ]  # fmt: skip
        run = measure(name, command, dict(os.environ), work / f"{out.name}.log")
        config = json.loads((out / "delta_config.json").read_text())
        rows[name] = {
            "wall_s": run.wall_s,
            "cpu_s": run.cpu_s,
            "peak_rss_gb": run.peak_rss_bytes / GB,
            "peak_anon_gb": run.peak_anon_bytes / GB,
            "stored_gb": sum(f["size"] for f in config["files"].values()) / GB,
            "returncode": run.returncode,
        }
        print(name, rows[name], flush=True)
    result["load_end"] = os.getloadavg()
    result["extractions"] = rows
    lines = [
        f"# `ftt-delta extract` memory on {SIZE} (the 8B model's largest tensors), {started}",
        "",
        f"Load average {result['load'][0]:.2f} → {result['load_end'][0]:.2f}; "
        f"{result['machine']['cores']} cores, {result['machine']['ram_gb']} GB RAM.",
        "",
        "| format | wall s | CPU s | peak RSS GB | of it anonymous GB | delta GB |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {name} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_gb']:.2f} | "
            f"{r['peak_anon_gb']:.2f} | {r['stored_gb']:.3f} |"
            for name, r in rows.items()
        ),
        "",
    ]
    write_result(args.results / f"delta-extract-memory-{started[:10]}", result, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
