"""``ftt-train``: TRL's SFT script (``trl/scripts/sft.py``) with the paper's summed loss.

    ftt-train --config olmo2_m4_math --output_dir out/ft_m4
    accelerate launch --config_file training/accelerate/zero3.yaml \\
        -m mergekit_ftt.training.sft --config olmo2_m4_math

A config holds TRL's keys (``SFTConfig``, ``ModelConfig``, ``DatasetMixtureConfig``) and
those of :class:`FttScriptArguments`; ``--config`` takes a shipped name
(``ftt-train --list-configs``) or a path, and command-line flags override it.
In Python, ``train(*parse_args(["--config", path]))`` returns the fine-tuned model's folder.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from trl import ModelConfig, SFTConfig

from mergekit_ftt.cli import entry_point
from mergekit_ftt.errors import FttError
from mergekit_ftt.sources import (
    DatasetUnavailable,
    Missing,
    Wanted,
    dataset_error,
    missing_dataset,
    missing_models,
    raise_unavailable,
    work_offline_if_hub_unreachable,
)
from mergekit_ftt.training.checks import prepare_output_dir, resolve_attn_implementation, validate
from mergekit_ftt.training.config import DatasetMixture, FttParser, FttScriptArguments

if TYPE_CHECKING:
    from transformers import TrainerCallback


def make_parser() -> FttParser:
    parser = FttParser(
        (FttScriptArguments, SFTConfig, ModelConfig, DatasetMixture), prog="ftt-train"
    )
    # The paper trains on the assistant's tokens only; TRL's default is every token.
    parser.set_defaults(assistant_only_loss=True)
    return parser


def parse_args(
    argv: Sequence[str] | None = None,
) -> tuple[FttScriptArguments, SFTConfig, ModelConfig, DatasetMixture]:
    """Parse ``--config NAME_OR_PATH`` and command-line overrides (``sys.argv`` if None)."""
    return tuple(make_parser().parse_args_and_config(argv))


def train(
    script_args: FttScriptArguments,
    training_args: SFTConfig,
    model_args: ModelConfig,
    dataset_args: DatasetMixture,
    callbacks: Sequence[TrainerCallback] = (),
) -> Path:
    """Fine-tune and save the model (with tokenizer and trainer state) to ``output_dir``.

    Model, data and output folder are checked before anything is written. Returns the
    output folder, ready to be a ``source_finetuned`` model of a ``finetuning_transfer``
    recipe. ``callbacks`` are transformers ``TrainerCallback``s.
    """
    validate(script_args, training_args, model_args)
    work_offline_if_hub_unreachable()
    # every model and dataset out of reach is named at once
    missing = missing_models([Wanted(model_args.model_name_or_path, model_args.model_revision)])
    try:
        train_dataset = load_train_dataset(script_args, dataset_args)
    except DatasetUnavailable as error:
        missing += error.missing
    raise_unavailable(missing)
    with training_args.main_process_first(desc="checking output_dir"):
        resume_from = training_args.resume_from_checkpoint or prepare_output_dir(
            script_args, training_args.output_dir
        )
    trainer = build_trainer(script_args, training_args, model_args, train_dataset, callbacks)
    result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    _report_throughput(trainer, result.metrics["train_runtime"])
    trainer.end()
    return Path(training_args.output_dir)


def load_train_dataset(script_args: FttScriptArguments, dataset_args: DatasetMixture):
    """The mixture under ``datasets:`` (TRL's ``get_dataset``), else ``dataset_name``."""
    import datasets
    from trl import get_dataset

    paths = [entry.path for entry in dataset_args.datasets] or [script_args.dataset_name]
    if paths == [None]:
        raise FttError(
            "no training data: add a `datasets:` list to the config (each entry a Hub id, or "
            "`path: json` with `data_files: FILE.jsonl`), or set `dataset_name`."
        )
    try:
        if dataset_args.datasets:
            return get_dataset(dataset_args)[script_args.dataset_train_split]
        return datasets.load_dataset(
            script_args.dataset_name,
            name=script_args.dataset_config,
            split=script_args.dataset_train_split,
        )
    except (OSError, ValueError) as error:  # datasets' "cannot load this": many types
        if len(dataset_args.datasets) > 1:  # name every one out of reach, not the first only
            raise DatasetUnavailable(
                _missing_entries(dataset_args)
                or [missing_dataset(error, f"the training data ({', '.join(paths)})")]
            ) from None
        raise dataset_error(error, f"the training data ({', '.join(paths)})") from None


def _missing_entries(dataset_args: DatasetMixture) -> list[Missing]:
    """The entries of a mixture that cannot be loaded, each loaded alone (the error path
    only: TRL's get_dataset stops at the first)."""
    from trl import get_dataset

    missing = []
    for entry in dataset_args.datasets:
        try:
            get_dataset(dataclasses.replace(dataset_args, datasets=[entry]))
        except (OSError, ValueError) as error:
            missing.append(missing_dataset(error, "training data"))
    return missing


def build_trainer(
    script_args: FttScriptArguments,
    training_args: SFTConfig,
    model_args: ModelConfig,
    train_dataset,
    callbacks: Sequence[TrainerCallback] = (),
):
    """The trainer for ``model_args``' model, as TRL's script builds it, with the Tülu
    template, the summed loss and ``total_batch_size``'s gradient accumulation."""
    from mergekit_ftt.chat_templates import load_tokenizer
    from mergekit_ftt.training.trainer import FttSFTTrainer

    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": resolve_attn_implementation(model_args.attn_implementation),
        "dtype": model_args.dtype,
    }
    training_args.model_init_kwargs = {
        **model_init_kwargs,
        **(training_args.model_init_kwargs or {}),
    }
    if script_args.total_batch_size is not None:
        per_step = training_args.per_device_train_batch_size * training_args.world_size
        training_args.gradient_accumulation_steps = script_args.total_batch_size // per_step
    return FttSFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=load_tokenizer(
            model_args.model_name_or_path,
            model_args.model_revision,
            training_args.trust_remote_code,
            script_args.chat_template,
            script_args.add_bos,
        ),
        loss_reduction=script_args.loss_reduction,
        callbacks=list(callbacks),
    )


def _report_throughput(trainer, runtime: float) -> None:
    tokens = next(
        (e["num_tokens"] for e in reversed(trainer.state.log_history) if "num_tokens" in e), 0
    )
    trainer.accelerator.print(
        f"trained {trainer.state.global_step} steps, {int(tokens)} tokens in {runtime:.1f} s "
        f"({tokens / runtime:.1f} tokens/s); model saved to {trainer.args.output_dir}"
    )


@entry_point("ftt-train")
def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``ftt-train``."""
    train(*parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
