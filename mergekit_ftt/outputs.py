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

    The work writes into ``.NAME.incomplete`` beside ``out_path`` (the context manager's
    value); on success that folder is renamed to ``out_path`` (one ``rename`` on one file
    system). A run killed at any point leaves only the hidden staging folder, never
    something at ``out_path`` that looks finished; the next run of the same command
    removes it and starts again. ``replace`` lets an existing ``out_path`` (one the caller
    checked may go, e.g. ``ftt-delta extract --overwrite``) be replaced; otherwise only an
    empty folder the user made is.
    """

    def __init__(self, out_path: str | Path, replace: bool = False) -> None:
        self.out = Path(out_path)
        self.replace = replace
        self.staging = self.out.with_name(f".{self.out.name}.incomplete")

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
        if self.out.is_dir():
            if self.replace:
                shutil.rmtree(self.out)
            else:
                self.out.rmdir()  # empty: callers refuse a folder with anything in it
        self.staging.rename(self.out)


def holds_finished_merge(out_path: str | Path, recipe_text: str) -> bool:
    """Whether ``out_path`` holds the finished merge of the recipe ``recipe_text``
    (mergekit writes the recipe as ``mergekit_config.yml`` beside the weights)."""
    out = Path(out_path)
    written = out / "mergekit_config.yml"
    if not (out / "config.json").exists() or not written.exists():
        return False
    return written.read_text(encoding="utf-8").strip() == recipe_text.strip()
