"""``ftt-train``'s configuration files: TRL's ``--config`` YAML, found by name, with includes.

- ``--config olmo2_m4_math`` is the shipped ``training/olmo2_m4_math.yaml``; a path works too.
- ``include: _olmo2_math.yaml`` (resolved next to the including file, as in lm-eval task
  YAMLs, else a shipped config by name: ``include: cpu_smoke``) reads a shared file first;
  the including file's keys win.
- Unknown keys are named, with the key to write instead (``warmup_ratio`` → ``warmup_steps``)
  or the nearest known key, before anything is loaded.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from trl import DatasetMixtureConfig, ScriptArguments, TrlParser
from trl.scripts.utils import DatasetConfig

from mergekit_ftt.errors import FttError
from mergekit_ftt.package_data import find_data_file, shipped_names, with_includes

# Keys people carry over from Open-Instruct or transformers 4.x, with what to write instead.
RENAMED_KEYS = {
    "warmup_ratio": "transformers 5 has no `warmup_ratio`: write `warmup_steps: 0.03` "
    "(a value below 1 is a ratio of max_steps)",
    "torch_dtype": "write `dtype`",
    "max_seq_length": "write `max_length`",
    "reduce_loss": "write `loss_reduction` (sum or mean)",
    "dataset_mixer_list": "write a `datasets:` list (TRL's DatasetMixtureConfig); without "
    "`fraction`, every dataset is used in full",
}


@dataclass
class DatasetMixture(DatasetMixtureConfig):
    """TRL's dataset mixture, naming an entry's unknown keys instead of a TypeError."""

    def __post_init__(self) -> None:
        known = {field.name for field in fields(DatasetConfig)}
        for entry in self.datasets:
            if isinstance(entry, dict) and set(entry) - known:
                hints = [_describe_unknown_key(key, known) for key in sorted(set(entry) - known)]
                raise FttError(
                    f"dataset {entry.get('path')!r}: unknown key(s) {', '.join(hints)}; "
                    f"allowed keys: {', '.join(sorted(known))}."
                )
        super().__post_init__()


class FttParser(TrlParser):
    """TrlParser that finds ``--config`` by name, reads ``include:`` and names unknown keys."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config_folder = Path.cwd()  # where a config's `include:` is looked for
        self.add_argument(
            "--list-configs",
            action=_ListConfigs,
            nargs=0,
            default=argparse.SUPPRESS,  # no value: HfArgumentParser returns dataclasses only
            help="print the shipped training and accelerate configs with their paths, and exit",
        )

    def parse_args_and_config(self, args: Iterable[str] | None = None, **kwargs: Any):
        args = list(sys.argv[1:] if args is None else args)
        if "--config" in args:
            at = args.index("--config") + 1
            if at < len(args):
                path = find_data_file("training", args[at])
                args[at], self.config_folder = str(path), path.parent
        try:
            return super().parse_args_and_config(args, **kwargs)
        except ValueError as error:  # the dataclasses' own checks, e.g. bf16 without a GPU
            raise FttError(f"invalid training config: {error}") from None

    def set_defaults_with_config(self, **config: Any) -> list[str]:
        config = with_includes(config, self.config_folder, shipped="training")
        known = {action.dest for action in self._actions}
        unknown = sorted(set(config) - known)
        if unknown:
            raise FttError(
                "unknown key(s) in the config file: "
                + "; ".join(_describe_unknown_key(key, known) for key in unknown)
            )
        return super().set_defaults_with_config(**config)


class _ListConfigs(argparse.Action):
    """``--list-configs``: names and paths, then exit (like ``--version``)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        for name in shipped_names("training"):
            print(f"{name:<30} {find_data_file('training', name)}")
        parser.exit()


def _describe_unknown_key(key: str, known: set[str]) -> str:
    if key in RENAMED_KEYS:
        return f"{key!r}: {RENAMED_KEYS[key]}"
    close = difflib.get_close_matches(key, known, n=1)
    return f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


@dataclass
class FttScriptArguments(ScriptArguments):
    """What the paper's Open-Instruct runs set that TRL's script does not."""

    chat_template: str = field(
        default="auto",
        metadata={
            "help": "`tulu`: always use the Tülu template; `auto`: the tokenizer's own "
            "template if it has one, else Tülu.",
            "choices": ["auto", "tulu"],
        },
    )
    add_bos: bool = field(
        default=True,
        metadata={"help": "Start the Tülu template with the BOS token (Open-Instruct --add_bos)."},
    )
    loss_reduction: str = field(
        default="sum",
        metadata={
            "help": "`sum`: Open-Instruct's reduce_loss=sum (summed token losses, divided "
            "by the accumulation steps); `mean`: TRL's mean over the batch's tokens.",
            "choices": ["sum", "mean"],
        },
    )
    total_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Sequences per optimizer step over all processes; sets "
            "gradient_accumulation_steps = total / (per_device_train_batch_size × processes)."
        },
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Continue from the last checkpoint-* in output_dir, if there is one."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow training into an output_dir that holds a model or checkpoints."},
    )
