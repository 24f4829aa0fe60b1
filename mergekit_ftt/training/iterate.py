"""Iterative transfer-then-finetune: transfer → fine-tune → transfer the new delta → …

    ftt-iterate --train-config olmo2_m5_math \\
        --source-base checkpoints/M4 --source-finetuned out/olmo2_m4_math \\
        --targets checkpoints/M4prime checkpoints/M5 --work-dir out/iterate

Round i writes ``round{i}/transfer.yml`` from a recipe template (``recipes/transfer_round.yml``
by default: method ``finetuning_transfer``), runs the real ``mergekit-yaml`` on it into
``round{i}/transferred`` = target_i + (finetuned_{i-1} − base_{i-1}), then fine-tunes that
with the training config into ``round{i}/finetuned``. The next round transfers
finetuned_i − target_i. Finished stages are skipped and a killed fine-tuning resumes from
its last checkpoint, so the same command continues an interrupted chain.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import yaml

from mergekit_ftt.cli import Stages, entry_point, installed_command
from mergekit_ftt.errors import FttError
from mergekit_ftt.package_data import find_data_file
from mergekit_ftt.sources import is_finished_model

TEMPLATE = "transfer_round"  # recipes/transfer_round.yml


@dataclass(frozen=True)
class Round:
    index: int
    target: Path
    source_base: Path
    source_finetuned: Path
    folder: Path

    @property
    def recipe(self) -> Path:
        return self.folder / "transfer.yml"

    @property
    def transferred(self) -> Path:
        return self.folder / "transferred"

    @property
    def finetuned(self) -> Path:
        return self.folder / "finetuned"


def plan_rounds(
    source_base: Path, source_finetuned: Path, targets: Sequence[Path], work_dir: Path
) -> list[Round]:
    """Each round's delta is the previous round's fine-tuned model minus its target."""
    rounds = []
    work_dir = work_dir.resolve()  # absolute, so that mergekit never takes it for a Hub id
    for index, target in enumerate(targets, start=1):
        round_ = Round(index, target, source_base, source_finetuned, work_dir / f"round{index}")
        rounds.append(round_)
        source_base, source_finetuned = target, round_.finetuned
    return rounds


def model_reference(path: Path) -> str:
    """How a recipe names a model: a relative local folder gets "./" (mergekit would take
    "checkpoints/M5" for a Hub id); anything else, e.g. "org/model@revision", is kept."""
    if path.is_dir() and not path.is_absolute():
        return f"./{path}"
    return str(path)


def fill_template(template: dict, round_: Round) -> dict:
    """The template with the placeholders TARGET, SOURCE_FINETUNED and SOURCE_BASE replaced
    by this round's models, wherever they stand as a whole value."""
    values = {
        "TARGET": model_reference(round_.target),
        "SOURCE_FINETUNED": model_reference(round_.source_finetuned),
        "SOURCE_BASE": model_reference(round_.source_base),
    }
    recipe = _substitute(template, values)
    for entry in recipe.get("models", []):
        role = (entry.get("parameters") or {}).get("role")
        expected = values.get(role.upper()) if isinstance(role, str) else None
        if entry.get("model") != expected:
            raise FttError(
                f"recipe template: model {entry.get('model')!r} has role {role!r}; use "
                "model SOURCE_FINETUNED with role source_finetuned and model SOURCE_BASE "
                "with role source_base."
            )
    roles = sorted(
        (entry.get("parameters") or {}).get("role") for entry in recipe.get("models", [])
    )
    if recipe.get("base_model") != values["TARGET"] or roles != ["source_base", "source_finetuned"]:
        raise FttError(
            "recipe template needs base_model: TARGET and exactly one source_finetuned and "
            "one source_base model."
        )
    return recipe


def _substitute(node, values: dict[str, str]):
    if isinstance(node, dict):
        return {key: _substitute(value, values) for key, value in node.items()}
    if isinstance(node, list):
        return [_substitute(value, values) for value in node]
    return values.get(node, node) if isinstance(node, str) else node


def run_transfer(
    round_: Round, template: dict, mergekit_args: Sequence[str], output: IO[str] | None = None
) -> list[str]:
    """Write the round's recipe and run ``mergekit-yaml`` on it (its output to ``output``,
    default the terminal); return the command."""
    mergekit_yaml = installed_command("mergekit-yaml")
    round_.folder.mkdir(parents=True, exist_ok=True)
    round_.recipe.write_text(yaml.safe_dump(fill_template(template, round_), sort_keys=False))
    command = [mergekit_yaml, str(round_.recipe), str(round_.transferred), *mergekit_args]
    if subprocess.run(command, stdout=output, stderr=output).returncode != 0:
        where = f"; its output is in {output.name}" if output is not None else ""
        raise FttError(f"round {round_.index}: mergekit-yaml failed on {round_.recipe}{where}.")
    return command


def run_finetune(
    round_: Round, train_config: str | Path, train_args: Sequence[str], launcher: str | None
) -> None:
    argv = [
        "--config", str(train_config),
        "--model_name_or_path", str(round_.transferred),
        "--output_dir", str(round_.finetuned),
        "--resume", "true",
        *train_args,
    ]  # fmt: skip
    if launcher is None:
        from mergekit_ftt.training import sft

        sft.train(*sft.parse_args(argv))
        return
    command = [*shlex.split(launcher), "-m", "mergekit_ftt.training.sft", *argv]
    if subprocess.run(command).returncode != 0:
        raise FttError(f"round {round_.index}: fine-tuning failed ({shlex.join(command)}).")


def iterate(
    train_config: str | Path,
    source_base: Path,
    source_finetuned: Path,
    targets: Sequence[Path],
    work_dir: Path,
    template: str | Path = TEMPLATE,
    train_args: Sequence[str] = (),
    mergekit_args: Sequence[str] = (),
    launcher: str | None = None,
) -> list[Round]:
    """Run every round, skipping finished stages; return the rounds. ``template`` is a
    recipe template's path, or the name of one in ``recipes/``."""
    say = Stages("ftt-iterate")
    recipe_template = load_template(template)
    rounds = plan_rounds(source_base, source_finetuned, targets, work_dir)
    for round_ in rounds:
        fill_template(recipe_template, round_)  # a bad template fails before any work
    for round_ in rounds:
        if is_finished_model(round_.transferred):
            say(f"round {round_.index}: {round_.transferred} exists, skipping the transfer")
        else:
            say(f"round {round_.index}: mergekit-yaml {round_.recipe} {round_.transferred}")
            run_transfer(round_, recipe_template, mergekit_args)
        if is_finished_model(round_.finetuned):
            say(f"round {round_.index}: {round_.finetuned} exists, skipping fine-tuning")
        else:
            say(f"round {round_.index}: fine-tuning {round_.transferred} -> {round_.finetuned}")
            run_finetune(round_, train_config, train_args, launcher)
    say(f"done: {rounds[-1].finetuned}")
    return rounds


def load_template(template: str | Path = TEMPLATE) -> dict:
    """A transfer-round recipe template: a path, or a name in ``recipes/``."""
    return yaml.safe_load(find_data_file("recipes", template).read_text(encoding="utf-8"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftt-iterate",
        description="Chain transfer (mergekit-yaml, finetuning_transfer) and fine-tuning (ftt-train).",
    )
    parser.add_argument(
        "--train-config", required=True, help="ftt-train config: a shipped name or a YAML path"
    )
    parser.add_argument("--source-base", type=Path, required=True, help="base of the first delta")
    parser.add_argument(
        "--source-finetuned", type=Path, required=True, help="fine-tuned model of the first delta"
    )
    parser.add_argument(
        "--targets",
        type=Path,
        nargs="+",
        required=True,
        help="checkpoints, one per round, in order",
    )
    parser.add_argument("--work-dir", type=Path, required=True, help="folder for all rounds")
    parser.add_argument(
        "--recipe-template",
        default=TEMPLATE,
        help="recipe with TARGET, SOURCE_FINETUNED, SOURCE_BASE placeholders: a path or a "
        "name in recipes/ (default: %(default)s)",
    )
    parser.add_argument(
        "--launcher",
        default=None,
        help="run fine-tuning through this command, e.g. 'accelerate launch --config_file "
        "training/accelerate/zero3.yaml' (default: in this process)",
    )
    parser.add_argument(
        "--mergekit-args", default="", help="extra mergekit-yaml options, e.g. '--cuda'"
    )
    parser.add_argument(
        "train_args", nargs=argparse.REMAINDER, help="after --: extra ftt-train overrides"
    )
    return parser


@entry_point("ftt-iterate")
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    iterate(
        args.train_config,
        args.source_base,
        args.source_finetuned,
        args.targets,
        args.work_dir,
        args.recipe_template,
        train_args,
        shlex.split(args.mergekit_args),
        args.launcher,
    )


if __name__ == "__main__":
    sys.exit(main())
