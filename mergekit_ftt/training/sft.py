"""Supervised fine-tuning with TRL, configured like ``trl/scripts/sft.py``: a YAML file
given with ``--config`` and command-line overrides, parsed by ``TrlParser`` into this
module's :class:`FttScriptArguments`, TRL's ``SFTConfig`` and ``ModelConfig``.

    ftt-train --config mergekit_ftt/training/configs/olmo2_m4_math.yaml --output_dir out/ft_m4
    accelerate launch --config_file mergekit_ftt/training/configs/accelerate/zero3.yaml \\
        -m mergekit_ftt.training.sft --config mergekit_ftt/training/configs/olmo2_m4_math.yaml

In Python: ``train(*parse_args(["--config", path, "--max_steps", "10"]))`` returns the
folder of the finished model.

What this adds to TRL's script: the Tülu chat template with BOS (Open-Instruct's
``--add_bos``), Open-Instruct's summed loss (``loss_reduction: sum``), an Open-Instruct
style dataset mixture (``data.py``), flash-attn only when it is installed and on CUDA,
``total_batch_size`` that sets gradient accumulation from the number of processes,
refusal to overwrite a finished model, ``resume: true``, and early, named errors for
unknown config keys and missing datasets.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergekit_ftt.tiny import TULU_CHAT_TEMPLATE
from mergekit_ftt.training.data import DatasetSource, DatasetSpecError, load_mixture

if TYPE_CHECKING:
    from transformers import TrainerCallback
    from trl import ModelConfig, SFTConfig, TrlParser

logger = logging.getLogger(__name__)

# Keys people carry over from Open-Instruct or transformers 4.x, with what to write instead.
RENAMED_KEYS = {
    "warmup_ratio": "transformers 5 has no `warmup_ratio`: write `warmup_steps: 0.03` "
    "(a value below 1 is a ratio of max_steps)",
    "torch_dtype": "write `dtype`",
    "max_seq_length": "write `max_length`",
    "reduce_loss": "write `loss_reduction` (sum or mean)",
    "dataset_mixer_list": "write a `datasets:` list with `fraction` or `rows` per dataset",
}


class ConfigError(ValueError):
    """The training configuration is invalid; raised before anything is loaded or written."""


@dataclass
class FttScriptArguments:
    """Arguments of ``ftt-train`` beyond TRL's ``SFTConfig`` and ``ModelConfig``."""

    datasets: list[DatasetSource] = field(
        default_factory=list,
        metadata={
            "help": "Datasets of the mixture: each a Hub id or local .json/.jsonl file under "
            "`path`, with optional name, split, revision, fraction or rows, columns."
        },
    )
    dataset_seed: int = field(
        default=123, metadata={"help": "Seed of the shuffle that picks `fraction`/`rows`."}
    )
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

    def __post_init__(self) -> None:
        # YAML gives mappings, the command line bare paths: both become DatasetSource.
        self.datasets = [DatasetSource.from_mapping(entry) for entry in self.datasets]


def _build_parser() -> TrlParser:
    from trl import ModelConfig, SFTConfig, TrlParser

    class FttParser(TrlParser):
        """TrlParser that names unknown config-file keys (TRL reports them as flags)."""

        def set_defaults_with_config(self, **kwargs: Any) -> list[str]:
            known = {action.dest for action in self._actions}
            unknown = sorted(set(kwargs) - known)
            if unknown:
                raise ConfigError(
                    "unknown key(s) in the config file: "
                    + "; ".join(_describe_unknown_key(key, known) for key in unknown)
                )
            return super().set_defaults_with_config(**kwargs)

    parser = FttParser((FttScriptArguments, SFTConfig, ModelConfig), prog="ftt-train")
    # The paper trains on the assistant's tokens only; TRL's default is every token.
    parser.set_defaults(assistant_only_loss=True)
    return parser


def _describe_unknown_key(key: str, known: set[str]) -> str:
    if key in RENAMED_KEYS:
        return f"{key!r}: {RENAMED_KEYS[key]}"
    close = difflib.get_close_matches(key, known, n=1)
    return f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def parse_args(
    argv: Sequence[str] | None = None,
) -> tuple[FttScriptArguments, SFTConfig, ModelConfig]:
    """Parse ``--config file.yaml`` and command-line overrides (``sys.argv`` if None)."""
    return tuple(_build_parser().parse_args_and_config(argv))


def tulu_chat_template(add_bos: bool) -> str:
    """The Tülu template (with TRL's generation markers), optionally starting with BOS."""
    return ("{{ bos_token }}" if add_bos else "") + TULU_CHAT_TEMPLATE


def resolve_attn_implementation(requested: str | None) -> str | None:
    """flash-attn 2 when installed and on CUDA, unless the config names an implementation."""
    import torch

    has_flash_attn = importlib.util.find_spec("flash_attn") is not None
    if requested is None:
        return "flash_attention_2" if has_flash_attn and torch.cuda.is_available() else None
    if requested == "flash_attention_2" and not has_flash_attn:
        raise ConfigError(
            "attn_implementation=flash_attention_2 needs flash-attn: "
            "`pip install flash-attn --no-build-isolation` (CUDA only), or leave "
            "attn_implementation unset to use it only where it is installed."
        )
    return requested


def validate(
    script_args: FttScriptArguments, sft_config: SFTConfig, model_config: ModelConfig
) -> None:
    """Checks that need no model or data, so that a bad config fails in seconds."""
    if not model_config.model_name_or_path:
        raise ConfigError("no model: set `model_name_or_path` (Hub id or local folder).")
    if model_config.use_peft:
        raise ConfigError(
            "use_peft is not supported: fine-tuning transfer needs the full fine-tuned weights."
        )
    if script_args.total_batch_size is not None:
        per_step = sft_config.per_device_train_batch_size * sft_config.world_size
        if script_args.total_batch_size % per_step:
            raise ConfigError(
                f"total_batch_size {script_args.total_batch_size} is not a multiple of "
                f"per_device_train_batch_size × processes = {per_step}; change one of them."
            )
    resolve_attn_implementation(model_config.attn_implementation)


def is_finished_model(folder: Path) -> bool:
    """A folder that already holds a saved model (config and weights at its top level)."""
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json"))
    return (folder / "config.json").is_file() and has_weights


def prepare_output_dir(script_args: FttScriptArguments, output_dir: str) -> str | None:
    """Refuse to clobber earlier work; return the checkpoint to resume from, if any."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    last_checkpoint = get_last_checkpoint(str(folder))
    if script_args.overwrite_output_dir:
        # Stale checkpoints would otherwise be picked up by a later `resume`.
        for checkpoint in folder.glob("checkpoint-*"):
            shutil.rmtree(checkpoint, ignore_errors=True)
        return None
    if is_finished_model(folder):
        raise ConfigError(
            f"output_dir {folder} already holds a finished model; choose another "
            "output_dir or pass --overwrite_output_dir true to replace it."
        )
    if script_args.resume:
        if last_checkpoint is None:
            logger.warning("resume: no checkpoint in %s, starting from the beginning", folder)
        return last_checkpoint
    if last_checkpoint is not None:
        raise ConfigError(
            f"output_dir {folder} holds checkpoints of an unfinished run (last: "
            f"{Path(last_checkpoint).name}); pass --resume true to continue it or "
            "--overwrite_output_dir true to start over."
        )
    return None


def load_tokenizer(
    script_args: FttScriptArguments, model_config: ModelConfig, trust_remote_code: bool
):
    """The model's tokenizer, with the Tülu template when asked for or when it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_config.model_name_or_path,
        revision=model_config.model_revision,
        trust_remote_code=trust_remote_code,
    )
    if script_args.chat_template == "tulu" or not tokenizer.chat_template:
        if script_args.add_bos and tokenizer.bos_token is None:
            raise ConfigError(
                f"add_bos is true but the tokenizer of {model_config.model_name_or_path} "
                "has no BOS token; set add_bos: false."
            )
        tokenizer.chat_template = tulu_chat_template(script_args.add_bos)
    return tokenizer


def _trainer_class():
    from trl import SFTTrainer

    class FttSFTTrainer(SFTTrainer):
        """SFTTrainer with Open-Instruct's summed loss as an option.

        TRL divides the summed token losses by the number of loss tokens in the whole
        optimizer step (over accumulation steps and processes). Open-Instruct's
        ``reduce_loss sum`` divides each rank's summed loss by the accumulation steps
        only, and data parallelism then averages over ranks. Passing that constant as
        ``num_items_in_batch`` gives the same gradient: TRL multiplies by the number of
        processes when ``average_tokens_across_devices`` is on, so the constant includes it.
        """

        def __init__(self, *args: Any, loss_reduction: str = "mean", **kwargs: Any):
            self.loss_reduction = loss_reduction
            if loss_reduction == "sum":
                self.loss_is_scaled_for_ga = True
            super().__init__(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.loss_reduction == "sum" and self.model.training:
                num_items_in_batch = self._sum_reduction_divisor()
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def _sum_reduction_divisor(self) -> int:
            divisor = self.current_gradient_accumulation_steps
            if self.args.average_tokens_across_devices:
                divisor *= self.accelerator.num_processes
            return divisor

    return FttSFTTrainer


def build_trainer(
    script_args: FttScriptArguments,
    sft_config: SFTConfig,
    model_config: ModelConfig,
    train_dataset,
    callbacks: Sequence[TrainerCallback] = (),
):
    """An SFT trainer for the model named in ``model_config`` (fills ``sft_config``'s
    ``model_init_kwargs`` and, with ``total_batch_size``, its accumulation steps)."""
    model_init_kwargs = {
        "revision": model_config.model_revision,
        "trust_remote_code": sft_config.trust_remote_code,
        "attn_implementation": resolve_attn_implementation(model_config.attn_implementation),
        "dtype": model_config.dtype,
    }
    sft_config.model_init_kwargs = {**model_init_kwargs, **(sft_config.model_init_kwargs or {})}
    if script_args.total_batch_size is not None:
        per_step = sft_config.per_device_train_batch_size * sft_config.world_size
        sft_config.gradient_accumulation_steps = script_args.total_batch_size // per_step
    tokenizer = load_tokenizer(script_args, model_config, sft_config.trust_remote_code)
    return _trainer_class()(
        model=model_config.model_name_or_path,
        args=sft_config,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        loss_reduction=script_args.loss_reduction,
        callbacks=list(callbacks),
    )


def train(
    script_args: FttScriptArguments,
    sft_config: SFTConfig,
    model_config: ModelConfig,
    callbacks: Sequence[TrainerCallback] = (),
) -> Path:
    """Fine-tune and save the model (with tokenizer and trainer state) to ``output_dir``.

    ``callbacks`` are transformers ``TrainerCallback``s (e.g. to record the loss curve).

    Returns the output folder, ready to be a ``source_finetuned`` model in a
    ``finetuning_transfer`` recipe.
    """
    validate(script_args, sft_config, model_config)
    with sft_config.main_process_first(desc="checking output_dir"):
        resume_from = sft_config.resume_from_checkpoint or prepare_output_dir(
            script_args, sft_config.output_dir
        )
    train_dataset = load_mixture(script_args.datasets, seed=script_args.dataset_seed)
    trainer = build_trainer(script_args, sft_config, model_config, train_dataset, callbacks)
    result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(sft_config.output_dir)
    trainer.save_state()
    _report_throughput(trainer, result.metrics)
    trainer.end()
    return Path(sft_config.output_dir)


def _report_throughput(trainer, metrics: dict[str, float]) -> None:
    logged = [entry["num_tokens"] for entry in trainer.state.log_history if "num_tokens" in entry]
    runtime = metrics.get("train_runtime")
    if logged and runtime:
        tokens = int(logged[-1])
        trainer.accelerator.print(
            f"trained {trainer.state.global_step} steps, {tokens} tokens in {runtime:.1f} s "
            f"({tokens / runtime:.1f} tokens/s); model saved to {trainer.args.output_dir}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``ftt-train``; also callable in-process with an argv list."""
    try:
        train(*parse_args(argv))
    except (ConfigError, DatasetSpecError) as error:
        if argv is not None:  # in-process callers get the exception
            raise
        print(f"ftt-train: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
