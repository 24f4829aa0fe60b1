"""What ``ftt-train`` checks before it loads or writes anything."""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from mergekit_ftt.errors import FttError
from mergekit_ftt.sources import is_finished_model

if TYPE_CHECKING:
    from trl import ModelConfig, SFTConfig

    from mergekit_ftt.training.config import FttScriptArguments

log = logging.getLogger(__name__)


def validate(
    script_args: FttScriptArguments, training_args: SFTConfig, model_args: ModelConfig
) -> None:
    """Checks that need no model or data, so that a bad config fails in seconds."""
    if not model_args.model_name_or_path:
        raise FttError("no model: set `model_name_or_path` (Hub id or local folder).")
    if model_args.use_peft:
        raise FttError(
            "use_peft is not supported: fine-tuning transfer needs the full fine-tuned weights."
        )
    if script_args.total_batch_size is not None:
        per_step = training_args.per_device_train_batch_size * training_args.world_size
        if script_args.total_batch_size % per_step:
            raise FttError(
                f"total_batch_size {script_args.total_batch_size} is not a multiple of "
                f"per_device_train_batch_size × processes = {per_step}; change one of them."
            )
    resolve_attn_implementation(model_args.attn_implementation)


def resolve_attn_implementation(requested: str | None) -> str | None:
    """flash-attn 2 when installed and on CUDA, unless the config names an implementation."""
    import torch

    has_flash_attn = importlib.util.find_spec("flash_attn") is not None
    if requested is None:
        return "flash_attention_2" if has_flash_attn and torch.cuda.is_available() else None
    if requested == "flash_attention_2" and not has_flash_attn:
        raise FttError(
            "attn_implementation=flash_attention_2 needs flash-attn: "
            "`pip install flash-attn --no-build-isolation` (CUDA only), or leave "
            "attn_implementation unset to use it only where it is installed."
        )
    return requested


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
        raise FttError(
            f"output_dir {folder} already holds a finished model; choose another "
            "output_dir or pass --overwrite_output_dir true to replace it."
        )
    if script_args.resume:
        if last_checkpoint is None:
            log.warning("resume: no checkpoint in %s, starting from the beginning", folder)
        return last_checkpoint
    if last_checkpoint is not None:
        raise FttError(
            f"output_dir {folder} holds checkpoints of an unfinished run (last: "
            f"{Path(last_checkpoint).name}); pass --resume true to continue it or "
            "--overwrite_output_dir true to start over."
        )
    return None
