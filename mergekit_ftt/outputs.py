"""What a ``finetuning_transfer`` output takes from its inputs besides the weights."""

from __future__ import annotations

import shutil
from pathlib import Path

from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_ftt import METHOD_NAME


def copy_generation_config(
    config: MergeConfiguration, out_path: str, options: MergeOptions
) -> None:
    """Give the output the generation config of the model its tokenizer comes from.

    mergekit copies ``generation_config.json`` together with the target's tokenizer, but
    not when ``tokenizer: {source: MODEL}`` builds the tokenizer from another model. An
    instruct delta needs the fine-tuned model's end-of-turn tokens (Llama 3.1 Instruct
    stops on ``<|eot_id|>``), so the generation config follows the tokenizer, as in the
    paper's script, which saved everything from the fine-tuned model.
    """
    if config.merge_method != METHOD_NAME or config.tokenizer is None:
        return
    source = config.tokenizer.source
    if not isinstance(source, ModelReference):
        return
    # For a BASE+ADAPTER source, the base model's folder: an adapter has no generation config.
    donor = Path(source.local_path(cache_dir=options.transformers_cache, ignore_lora=True))
    if (donor / "generation_config.json").exists():
        shutil.copy(donor / "generation_config.json", Path(out_path) / "generation_config.json")
