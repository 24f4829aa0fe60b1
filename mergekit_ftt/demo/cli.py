"""``ftt-demo``: the paper's checkpoint-to-checkpoint transfer in miniature, offline on a CPU.

ftt-demo                       # full run (2-3 minutes on 2 cores), output in ftt-demo-out/
ftt-demo --quick --out /tmp/d  # smaller and faster (about 1.5 minutes)
ftt-demo --finetune-after      # also transfer-then-finetune vs fine-tuning M_b alone
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path

from mergekit_ftt.demo import pipeline
from mergekit_ftt.demo.config import load_config
from mergekit_ftt.demo.pipeline import FT_A, FT_B, M_A, M_B, TRANSFER, Layout, say

RUN_FILE = "demo.json"
DEMO_MODULES = ("trl", "datasets", "lm_eval", "matplotlib")  # the [demo] extra
LABELS = (M_A, M_B, FT_A, FT_B, TRANSFER)
TITLE = "ftt-demo: tiny OLMo 2, held-out chat sums"


class DemoError(RuntimeError):
    """The demo cannot start; the message names the problem and the fix."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftt-demo",
        description="Pre-train a tiny OLMo 2 to two checkpoints M_a and M_b, fine-tune M_a with "
        "ftt-train, transfer M_b + (FT(M_a) − M_a) with mergekit-yaml, evaluate with lm-eval.",
    )
    parser.add_argument("--out", type=Path, default=Path("ftt-demo-out"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, models and training")
    parser.add_argument("--quick", action="store_true", help="smaller run, for tests (~1.5 min)")
    parser.add_argument(
        "--finetune-after",
        action="store_true",
        help="also fine-tune M_b and M_b + Δ_a further and compare how fast they learn",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a finished demo run in --out"
    )
    parser.add_argument(
        "--matrix",
        nargs="?",
        const=3,
        type=int,
        metavar="SEEDS",
        help="the paper's Table 3 in miniature: 5 checkpoints, every ordered transfer, "
        "ftt-inspect's prediction against the measured efficiency, over SEEDS seeds from "
        "--seed on (default 3); written to --out/matrix-full (--quick: matrix-quick)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default from the preset: 1, fastest on a busy 2-core machine)",
    )
    return parser


def require_extras() -> None:
    """The demo runs the training and eval stacks: say what to install if one is missing."""
    missing = [name for name in DEMO_MODULES if find_spec(name) is None]
    if missing:
        raise DemoError(
            f"ftt-demo needs {', '.join(missing)}, which is not installed: "
            "pip install 'mergekit-ftt[demo]'"
        )


def prepare_output(out: Path, settings: dict, parts: list[str], overwrite: bool) -> None:
    """Start, resume or (with ``--overwrite``) restart the run in ``out``; never clobber
    a finished run or a folder that is not a demo run."""
    record_path = out / RUN_FILE
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} is a file; give a folder")
    if out.exists() and any(out.iterdir()) and not record_path.exists():
        raise DemoError(f"{out} is not empty and holds no demo run; choose another --out")
    if record_path.exists():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        finished = set(record.get("finished", []))
        if overwrite:
            shutil.rmtree(out)
        elif set(parts) <= finished:
            raise DemoError(
                f"{out} holds a finished demo run; pass --overwrite to run it again, "
                "or choose another --out"
            )
        elif record["settings"] != settings:
            raise DemoError(
                f"{out} holds a demo run with other settings "
                f"({record['settings']['preset']}, seed {record['settings']['seed']}); "
                "rerun with those to resume it, pass --overwrite, or choose another --out"
            )
        else:
            say(f"resuming the run in {out}: finished stages are skipped")
            return
    out.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps({"settings": settings, "finished": []}, indent=2))


def mark_finished(out: Path, part: str) -> None:
    record_path = out / RUN_FILE
    record = json.loads(record_path.read_text(encoding="utf-8"))
    record["finished"] = sorted({*record["finished"], part})
    record_path.write_text(json.dumps(record, indent=2))


def run(args: argparse.Namespace) -> None:
    require_extras()
    import torch

    preset = "quick" if args.quick else "full"
    config = load_config(preset)
    threads = args.threads or config.torch_threads
    torch.set_num_threads(threads)
    if args.matrix:
        from mergekit_ftt.demo import matrix

        matrix.run(args.out, args.quick, args.seed, args.matrix, threads, args.overwrite)
        return
    settings = {"preset": preset, "seed": args.seed, "config": config.to_dict()}
    parts = ["main", *(["finetune_after"] if args.finetune_after else [])]
    prepare_output(args.out, settings, parts, args.overwrite)
    layout = Layout(args.out)

    world = pipeline.write_data(layout, config, args.seed)
    pipeline.run_pretraining(layout, config, world, args.seed)
    pipeline.run_finetuning(layout, config, args.seed)
    pipeline.run_transfer(layout, threads)
    say("evaluating with lm-eval (hf backend, chat template, exact match)")
    pipeline.evaluate(layout, LABELS)
    table, paths = pipeline.write_report(layout, LABELS, TITLE)
    mark_finished(args.out, "main")
    if args.finetune_after:
        from mergekit_ftt.demo import finetune_after

        paths.update(finetune_after.run(layout, config, args.seed))
        mark_finished(args.out, "finetune_after")

    print()
    print(table)
    print(
        f"M_a = stage-2 step {config.checkpoint_a_step}, M_b = stage-2 step "
        f"{config.pretrain.stage2.steps} of one pre-training run; FT(·) = fine-tuned with "
        f"ftt-train on chat questions about early facts; test = {config.task.test_examples} "
        f"held-out chat questions about facts first told in stage 2; {TRANSFER} = "
        "M_b + (FT(M_a) − M_a) by mergekit-yaml (finetuning_transfer)."
    )
    for kind, path in paths.items():
        print(f"  {kind}: {path}")
    say("done")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mergekit_ftt.training.iterate import IterateError

    try:
        run(args)
    except (DemoError, IterateError) as error:
        print(f"ftt-demo: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
