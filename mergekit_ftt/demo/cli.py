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
from mergekit_ftt.demo.calibration import SeedSplit
from mergekit_ftt.demo.calibration import parse_seeds as calibration_seeds
from mergekit_ftt.demo.config import DemoConfig, load_config
from mergekit_ftt.demo.pipeline import FT_A, FT_B, M_A, M_B, TRANSFER, Layout
from mergekit_ftt.errors import FttError

RUN_FILE = "demo.json"
LOG_FILE = "ftt-demo.log"
DEMO_MODULES = ("trl", "datasets", "lm_eval", "matplotlib")  # the [demo] extra
LABELS = (M_A, M_B, FT_A, FT_B, TRANSFER)
TITLE = "ftt-demo: tiny OLMo 2, held-out chat sums"
PRESETS = ("full", "quick", "llama", "llama-quick")


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
        "--preset",
        choices=PRESETS,
        default=None,
        help="settings from mergekit_ftt/demo/configs/PRESET.yaml (default full; --quick is "
        "quick); llama: the second miniature, a tiny Llama with grouped-query attention and tied "
        "embeddings, product facts and a stronger fine-tuning",
    )
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
        "--seed on (default 3); written to --out/matrix-PRESET",
    )
    parser.add_argument(
        "--calibration-seeds",
        type=_seeds,
        default=None,
        metavar="0,1,2",
        help="with --heldout-seeds: the matrix seeds the verdict's curve is fitted on; the "
        "report scores it on the held-out seeds only (implies --matrix)",
    )
    parser.add_argument(
        "--heldout-seeds",
        type=_seeds,
        default=None,
        metavar="3,4,5",
        help="matrix seeds no fit sees: the report gives the shipped calibration's and the "
        "refitted curve's Spearman ρ, RMS error and level agreement on them, with their spread "
        "(implies --matrix)",
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


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return calibration_seeds(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def preset_of(args: argparse.Namespace) -> str:
    """The preset asked for; the Llama ones belong to the matrix (the plain demo's table and
    captions describe the OLMo 2 sums)."""
    if args.quick and args.preset not in (None, "quick"):
        raise FttError(f"--quick is --preset quick: give one of --quick and --preset {args.preset}")
    preset = "quick" if args.quick else args.preset or "full"
    if args.matrix is None and preset not in ("full", "quick"):
        raise FttError(
            f"--preset {preset} is a miniature for the matrix: add --matrix or --heldout-seeds"
        )
    return preset


def matrix_seeds(args: argparse.Namespace) -> tuple[list[int], SeedSplit | None]:
    """The seeds --matrix runs, and the calibration / held-out split when one was given."""
    if args.heldout_seeds is None:
        if args.calibration_seeds is not None:
            raise FttError("--calibration-seeds needs --heldout-seeds, the seeds to score it on")
        return list(range(args.seed, args.seed + args.matrix)), None
    try:
        split = SeedSplit(args.calibration_seeds or (), args.heldout_seeds)
    except ValueError as error:
        raise FttError(str(error)) from None
    if getattr(args, "matrix_given", False) and args.matrix != len(split.seeds):
        raise FttError(
            f"--matrix {args.matrix} and the {len(split.seeds)} calibration and held-out seeds "
            "disagree: drop --matrix, the seed lists say which seeds run"
        )
    return list(split.seeds), split


def _refuse_unused_with_matrix(args: argparse.Namespace) -> None:
    """--matrix runs its own stages: what it cannot honour is refused, never ignored."""
    args.matrix_given = args.matrix is not None
    if args.heldout_seeds is not None or args.calibration_seeds is not None:
        args.matrix = 3 if args.matrix is None else args.matrix  # the seed lists imply --matrix
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
    preset = preset_of(args)
    config = load_config(preset)
    threads = args.threads or config.torch_threads
    torch.set_num_threads(threads)
    if args.matrix is not None:
        seeds, split = matrix_seeds(args)
        matrix.run(args.out, preset, seeds, threads, args.overwrite, split, args.verbose)
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
