"""Where each model of a recipe is, in the one model lookup (:mod:`mergekit_ftt.sources`),
and the local folders written so that mergekit's model card does not take them for Hub ids.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from mergekit.common import ModelPath, ModelReference
from mergekit.config import MergeConfiguration
from pydantic import BaseModel

from mergekit_ftt import hub
from mergekit_ftt.errors import FinetuningTransferError
from mergekit_ftt.preflight.recipe import referenced_models
from mergekit_ftt.sources import LORA_ADAPTER, Missing, Wanted, missing_models, raise_unavailable


def locate_all(config: MergeConfiguration) -> None:
    """Make sure mergekit will find every model of ``config`` (and LoRA adapter): a local
    folder with the right files, or a Hub repository this machine can download; name all
    those it cannot in one :class:`FinetuningTransferError`."""
    raise_unavailable(missing_recipe_models(config), FinetuningTransferError)


def missing_recipe_models(config: MergeConfiguration) -> list[Missing]:
    """The models and LoRA adapters of ``config`` that mergekit could not load. A cached
    copy does not serve offline: mergekit 0.1.5 asks the Hub for the file list of every
    Hub model."""
    wanted = (w for model in referenced_models(config) for w in wanted_paths(model))
    return missing_models(wanted, cache_suffices=False)


def wanted_paths(model: ModelReference) -> Iterator[Wanted]:
    """What the lookup checks for ``model``: its folder or Hub id, and its LoRA adapter."""
    yield Wanted(model.model.path, model.model.revision)
    if model.lora is not None:
        yield Wanted(model.lora.path, model.lora.revision, *LORA_ADAPTER)


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
