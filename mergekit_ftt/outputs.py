"""A ``finetuning_transfer`` output: written whole or not at all, and what it takes from
its inputs besides the weights."""

from __future__ import annotations

import shutil
from pathlib import Path

from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_ftt import METHOD_NAME
from mergekit_ftt.card import write_transfer_card


def finish_output(
    config: MergeConfiguration, out_path: str, options: MergeOptions, name: str | None = None
) -> None:
    """The transfer's model card (``name``: the output's name, default the folder's) in
    place of mergekit's, and the generation config of the model its tokenizer comes from.

    mergekit copies ``generation_config.json`` together with the target's tokenizer, but
    not when ``tokenizer: {source: MODEL}`` builds the tokenizer from another model. An
    instruct delta needs the fine-tuned model's end-of-turn tokens (Llama 3.1 Instruct
    stops on ``<|eot_id|>``), so the generation config follows the tokenizer, as in the
    paper's script, which saved everything from the fine-tuned model.
    """
    write_transfer_card(config, out_path, name)  # roles, α and lineage
    if config.merge_method != METHOD_NAME or config.tokenizer is None:
        return
    source = config.tokenizer.source
    if not isinstance(source, ModelReference):
        return
    # For a BASE+ADAPTER source, the base model's folder: an adapter has no generation config.
    donor = Path(source.local_path(cache_dir=options.transformers_cache, ignore_lora=True))
    if (donor / "generation_config.json").exists():
        shutil.copy(donor / "generation_config.json", Path(out_path) / "generation_config.json")


class StagedOutput:
    """Write an output folder so that it exists only once it is complete.

    The merge writes into ``.NAME.incomplete`` beside ``out_path``; on success the folder
    is renamed to ``out_path`` (one ``rename`` on one file system). A run killed at any
    point leaves only the staging folder, never something at ``out_path`` that looks like
    a model; the next run of the same command removes it and starts again. A run that
    finds ``out_path`` already holding this very recipe's merge reports it complete.
    """

    def __init__(self, out_path: str | Path, recipe_text: str) -> None:
        self.out = Path(out_path)
        self.recipe_text = recipe_text
        self.staging = self.out.with_name(f".{self.out.name}.incomplete")
        self.why_complete = ""

    def is_complete(self) -> bool:
        """Whether ``out_path`` holds the finished merge of this same recipe."""
        written = self.out / "mergekit_config.yml"
        if not (self.out / "config.json").exists() or not written.exists():
            return False
        if written.read_text(encoding="utf-8").strip() != self.recipe_text.strip():
            return False
        self.why_complete = (
            "it holds this recipe's finished merge (its mergekit_config.yml matches); "
            "nothing to do. Delete the folder to merge again."
        )
        return True

    def __enter__(self) -> Path:
        if self.staging.exists():  # left by a run that was killed
            print(f"mergekit-ftt: removing {self.staging}, left by an interrupted run")
            shutil.rmtree(self.staging)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        return self.staging

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            return
        if self.out.is_dir():  # an empty folder the user made (the preflight checked it)
            self.out.rmdir()
        self.staging.rename(self.out)
