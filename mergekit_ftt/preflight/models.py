"""Where each model of a recipe is: a local folder, or a Hub repository this machine can fetch.

A Hub repository is asked for once, without retries (:mod:`mergekit_ftt.hub`), before
mergekit's own requests, which retry for about 25 s and then end in a traceback.
"""

from __future__ import annotations

import os

from mergekit.common import ModelPath, ModelReference
from mergekit.config import MergeConfiguration
from pydantic import BaseModel

from mergekit_ftt import hub
from mergekit_ftt.errors import FinetuningTransferError
from mergekit_ftt.preflight.checkpoints import WEIGHT_FILES
from mergekit_ftt.preflight.recipe import referenced_models


def locate(model: ModelReference) -> None:
    """Make sure mergekit will find ``model`` (and its LoRA adapter): a local folder with
    the right files, or a Hub repository this machine can download."""
    _locate_path(model.model, "config.json", "a transformers model")
    if model.lora is not None:
        _locate_path(model.lora, "adapter_config.json", "a PEFT LoRA adapter")


def _locate_path(path: ModelPath, marker: str, kind: str) -> None:
    name = path.path
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, marker)):
            raise FinetuningTransferError(
                f"{name} has no {marker}, so it is not {kind} folder: point the recipe at "
                f"the folder that holds {marker}."
            )
        return
    if os.path.exists(name):
        raise FinetuningTransferError(
            f"{name} is a file; the recipe needs the folder of {kind} (the one with {marker})."
        )
    if not hub.is_repo_id(name):
        raise FinetuningTransferError(
            f"there is no folder {name} (looked in {os.getcwd()}): check the path in the recipe."
        )
    try:
        hub.probe(name, marker, revision=path.revision)
    except Exception as error:
        message = hub.explain(error, name, revision=path.revision, filename=marker)
        if message is None:
            raise
        raise FinetuningTransferError(_unreachable(error, name, path.revision, message)) from None


def _unreachable(error: BaseException, repo_id: str, revision: str | None, message: str) -> str:
    """Where the Hub cannot be reached, say what works offline: mergekit 0.1.5 lists a Hub
    model's files on the Hub before every merge, so even a cached copy needs its folder."""
    offline = isinstance(error, hub.OfflineModeIsEnabled)
    if not offline and not hub.is_network_error(error):
        return message
    snapshot = hub.cached_snapshot(repo_id, revision)
    if snapshot is not None and not any(
        os.path.exists(os.path.join(snapshot, weights)) for weights in WEIGHT_FILES
    ):
        snapshot = None  # only the config was fetched (by transformers, say)
    if snapshot is not None:
        fix = f"A copy is in the Hugging Face cache: write {snapshot} in the recipe"
    else:
        fix = (
            f"Download it while online ({hub.download_hint(repo_id, revision)}) and write "
            "that folder in the recipe"
        )
    if offline:
        return (
            f"{repo_id} is not a folder here ({os.getcwd()}), and with HF_HUB_OFFLINE set it "
            "cannot come from the Hub either: mergekit asks the Hub for the file list of "
            f"every Hub model, even a cached one. {fix}, or unset HF_HUB_OFFLINE."
        )
    return f"{message} {fix}." if snapshot is not None else message


def card_safe_paths(config: MergeConfiguration) -> MergeConfiguration:
    """Write local folders such as ``models/ft`` as ``./models/ft``.

    mergekit's model card, written after the weights, asks the Hub whether a path with at
    most one '/' is a Hub repository, even when the folder exists. Without network that
    request fails after the weights and config.json are written, leaving a model without
    its tokenizer; with network the card may link someone else's repository.
    """
    renamed = {}
    for model in referenced_models(config):
        paths = [p for p in (model.model, model.lora) if p is not None and _card_asks_hub(p)]
        if paths:
            renamed[model] = model.model_copy(
                update={
                    field: getattr(model, field).model_copy(
                        update={"path": os.path.join(".", getattr(model, field).path)}
                    )
                    for field in ("model", "lora")
                    if getattr(model, field) in paths
                }
            )
    return _replace_models(config, renamed) if renamed else config


def _card_asks_hub(path: ModelPath) -> bool:
    name = path.path
    return (
        name[:1] not in ("/", "~", ".") and name.count("/") <= 1 and os.path.exists(name)
    ) and hub.is_repo_id(name)


def _replace_models(node, renamed: dict[ModelReference, ModelReference]):
    if isinstance(node, ModelReference):
        return renamed.get(node, node)
    if isinstance(node, BaseModel):
        update = {}
        for field in type(node).model_fields:
            value = getattr(node, field)
            replaced = _replace_models(value, renamed)
            if replaced is not value:
                update[field] = replaced
        return node.model_copy(update=update) if update else node
    if isinstance(node, list | tuple):
        items = [_replace_models(item, renamed) for item in node]
        changed = any(new is not old for new, old in zip(items, node, strict=True))
        return type(node)(items) if changed else node
    if isinstance(node, dict):
        items = {key: _replace_models(value, renamed) for key, value in node.items()}
        changed = any(items[key] is not value for key, value in node.items())
        return items if changed else node
    return node
