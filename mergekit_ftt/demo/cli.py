"""``ftt-demo``: the paper's checkpoint-to-checkpoint transfer in miniature, offline on a CPU.

ftt-demo                       # full run (2-3 minutes on an idle 2-core machine), in ftt-demo-out/
ftt-demo --quick --out /tmp/d  # smaller and faster: what the test suite runs
ftt-demo --finetune-after      # also transfer-then-finetune vs fine-tuning M_b alone

It prints its stage lines, one progress bar per long stage and the table; what TRL,
transformers, datasets, lm-eval and mergekit print goes to ``ftt-demo.log`` in the output
folder (``--verbose`` shows it instead).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path

from mergekit_ftt.cli import Stages, entry_point, library_logs
from mergekit_ftt.demo import matrix, pipeline
from mergekit_ftt.demo.config import DemoConfig, load_config
from mergekit_ftt.demo.pipeline import FT_A, FT_B, M_A, M_B, TRANSFER, Layout
from mergekit_ftt.errors import FttError

RUN_FILE = "demo.json"
LOG_FILE = "ftt-demo.log"
DEMO_MODULES = ("trl", "datasets", "lm_eval", "matplotlib")  # the [demo] extra
LABELS = (M_A, M_B, FT_A, FT_B, TRANSFER)
TITLE = "ftt-demo: tiny OLMo 2, held-out chat sums"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftt-demo",
        description="Pre-train a tiny OLMo 2 to two checkpoints M_a and M_b, fine-tune M_a with "
        "ftt-train, transfer M_b + (FT(M_a) − M_a) with mergekit-yaml, evaluate with lm-eval.",
    )
    parser.add_argument("--out", type=Path, default=Path("ftt-demo-out"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, models and training")
    parser.add_argument("--quick", action="store_true", help="smaller run, for tests")
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
    parser.add_argument(
        "--verbose",
        action="store_true",
        help=f"show the libraries' logs instead of writing them to OUT/{LOG_FILE} "
        f"(--matrix: OUT/matrix-*/{matrix.LOG_FILE})",
    )
    return parser


def require_extras() -> None:
    """The demo runs the training and eval stacks: say what to install if one is missing."""
    missing = [name for name in DEMO_MODULES if find_spec(name) is None]
    if missing:
        raise FttError(
            f"ftt-demo needs {', '.join(missing)}, which is not installed: "
            "pip install 'mergekit-ftt[demo]'"
        )


def prepare_output(
    out: Path, settings: dict, parts: list[str], overwrite: bool, say: Stages | None = None
) -> None:
    """Start, resume or (with ``--overwrite``) restart the run in ``out``; never clobber
    a finished run or a folder that is not a demo run."""
    record_path = out / RUN_FILE
    if out.exists() and not out.is_dir():
        raise FttError(f"--out {out} is a file; give a folder")
    if out.exists() and any(out.iterdir()) and not record_path.exists():
        raise FttError(f"{out} is not empty and holds no demo run; choose another --out")
    if record_path.exists():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        finished = set(record.get("finished", []))
        if overwrite:
            shutil.rmtree(out)
        elif set(parts) <= finished:
            raise FttError(
                f"{out} holds a finished demo run; pass --overwrite to run it again, "
                "or choose another --out"
            )
        elif record["settings"] != settings:
            raise FttError(
                f"{out} holds a demo run with other settings "
                f"({record['settings']['preset']}, seed {record['settings']['seed']}); "
                "rerun with those to resume it, pass --overwrite, or choose another --out"
            )
        else:
            if say is not None:
                say(f"resuming the run in {out}: finished stages are skipped")
            return
    out.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps({"settings": settings, "finished": []}, indent=2))


def mark_finished(out: Path, part: str) -> None:
    record_path = out / RUN_FILE
    record = json.loads(record_path.read_text(encoding="utf-8"))
    record["finished"] = sorted({*record["finished"], part})
    record_path.write_text(json.dumps(record, indent=2))


def run_main_table(
    layout: Layout, config: DemoConfig, seed: int, threads: int, say: Stages, log
) -> tuple[str, dict[str, Path]]:
    """Data, pre-training, fine-tuning, transfer and evaluation: the demo's table."""
    world = pipeline.write_data(layout, config, seed)
    say(
        f"data: {config.task.sft_examples} chat questions about early facts for SFT, "
        f"{config.task.test_examples} held-out questions about late facts ({layout.data})"
    )
    pipeline.run_pretraining(layout, config, world, seed, say)
    pipeline.run_finetuning(layout, config, seed, say)
    pipeline.run_transfer(layout, threads, say, log)
    say(f"evaluating {len(LABELS)} models with lm-eval (hf backend, chat template, exact match)")
    pipeline.evaluate_table_models(layout, LABELS, say)
    return pipeline.write_report(layout, LABELS, TITLE)


def caption(config: DemoConfig) -> str:
    return (
        f"M_a = stage-2 step {config.checkpoint_a_step}, M_b = stage-2 step "
        f"{config.pretrain.stage2.steps} of one pre-training run; FT(·) = fine-tuned with "
        f"ftt-train on chat questions about early facts; test = {config.task.test_examples} "
        f"held-out chat questions about facts first told in stage 2; {TRANSFER} = "
        "M_b + (FT(M_a) − M_a) by mergekit-yaml (finetuning_transfer)."
    )


def _refuse_unused_with_matrix(args: argparse.Namespace) -> None:
    """--matrix runs its own stages: what it cannot honour is refused, never ignored."""
    if args.matrix is None:
        return
    if args.matrix < 1:
        raise FttError(f"--matrix {args.matrix}: give the number of seeds, 1 or more (alone: 3)")
    if args.finetune_after:
        raise FttError(
            "--matrix does not take --finetune-after, which belongs to the plain demo: drop "
            "it, or run the plain demo without --matrix."
        )


@entry_point("ftt-demo")
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _refuse_unused_with_matrix(args)
    require_extras()
    import torch

    say = Stages("ftt-demo")
    preset = "quick" if args.quick else "full"
    config = load_config(preset)
    threads = args.threads or config.torch_threads
    torch.set_num_threads(threads)
    if args.matrix is not None:
        matrix.run(
            args.out, args.quick, args.seed, args.matrix, threads, args.overwrite, args.verbose
        )
        return
    settings = {"preset": preset, "seed": args.seed, "config": config.to_dict()}
    parts = ["main", *(["finetune_after"] if args.finetune_after else [])]
    prepare_output(args.out, settings, parts, args.overwrite, say)
    layout = Layout(args.out)

    with library_logs(args.out / LOG_FILE, args.verbose) as log:
        table, paths = run_main_table(layout, config, args.seed, threads, say, log)
        mark_finished(args.out, "main")
        if args.finetune_after:
            from mergekit_ftt.demo import finetune_after

            paths.update(finetune_after.run(layout, config, args.seed, say))
            mark_finished(args.out, "finetune_after")

    say.print()
    say.print(table)
    say.print(caption(config))
    folder = Path(next(iter(paths.values()))).parent
    say.print(f"  report in {folder}: {', '.join(Path(path).name for path in paths.values())}")
    logs = "" if args.verbose else f"; library logs in {args.out / LOG_FILE}"
    say(f"done{logs}")


if __name__ == "__main__":
    sys.exit(main())
