"""Checks of ``role: delta`` inputs before a merge reads a weight or writes a file.

The preflight (:mod:`mergekit_ftt.preflight`) calls :func:`check_delta_inputs` for every
``finetuning_transfer`` merge. A delta is refused, naming the delta, the target and the
fix, when its format version is unknown, its files do not match ``delta_config.json``
(size, header or sha256), it was taken from another architecture or other shapes than
the target's, its input also names a ``source_base``, or its vocabulary rows would not
line up with the output's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_ftt.delta.format import DeltaConfig, is_delta_folder
from mergekit_ftt.delta.loader import open_delta
from mergekit_ftt.errors import DeltaError
from mergekit_ftt.preflight.checkpoints import StoredCheckpoint, StoredTensor
from mergekit_ftt.preflight.recipe import model_entries


def local_folder(model: ModelReference, options: MergeOptions) -> str | None:
    """The model's local folder, downloading a Hub model's files as mergekit would."""
    if model.lora is not None:
        return None
    return model.local_path(options.transformers_cache)


def delta_checkpoint(model: ModelReference, options: MergeOptions) -> StoredCheckpoint | None:
    """The tensors mergekit will load from a delta folder (decoded: the model's names and
    shapes, the stored dtype of Δ), or None when ``model`` is not a delta folder."""
    folder = local_folder(model, options)
    if folder is None or not is_delta_folder(folder):
        return None
    config = open_delta(folder).config
    dtype = getattr(torch, config.encoding.dtype)
    return StoredCheckpoint(
        model=model,
        folder=folder,
        tensors={
            name: StoredTensor(tuple(info.shape), dtype, next(iter(info.components.values())).file)
            for name, info in config.tensors.items()
        },
    )


def _is_local_delta(model: ModelReference) -> bool:
    path = str(model.model.path)
    return model.lora is None and os.path.isdir(path) and is_delta_folder(path)


def check_delta_roles(
    config: MergeConfiguration, target: ModelReference, roles: Mapping[ModelReference, str]
) -> None:
    """The recipe's part: delta folders have `role: delta` and no `source_base` of their
    own, and nothing else is given that role (local folders; Hub ones once downloaded)."""
    if _is_local_delta(target):
        raise DeltaError(
            f"base_model {target} is a delta folder; base_model is the target model that "
            f"receives the delta. Give the delta as an input with `role: delta`."
        )
    for model, parameters in model_entries(config):
        if roles.get(model) == "delta" and "source_base" in (parameters or {}):
            raise DeltaError(
                f"{model} has `role: delta` and a `source_base`: a delta already holds "
                "fine-tuned − base. Remove `source_base` from its parameters (or give the "
                "fine-tuned model itself with `role: source_finetuned`)."
            )
    for model, role in roles.items():
        if os.path.exists(str(model.model.path)):
            _check_role(model, role, _is_local_delta(model))


def _check_role(model: ModelReference, role: str, is_delta: bool) -> None:
    if role == "delta" and not is_delta:
        raise DeltaError(
            f"{model} has `role: delta` but is not a delta folder (no delta_config.json). "
            "Make one with `ftt-delta extract`, or give a fine-tuned model "
            "`role: source_finetuned` together with its `role: source_base`."
        )
    if role != "delta" and is_delta:
        raise DeltaError(
            f"{model} is a delta folder; give it `parameters: {{role: delta}}` (it "
            "already holds fine-tuned − base, so it takes no source_base)."
        )


def check_delta_inputs(
    config: MergeConfiguration,
    target: ModelReference,
    roles: Mapping[ModelReference, str],
    options: MergeOptions,
) -> None:
    """Raise :class:`DeltaError` for a delta input that cannot be applied to ``target``:
    unknown format version, files that do not match ``delta_config.json``, another
    architecture or shape than the target's, vocabulary rows that would not line up."""
    for model, role in roles.items():
        folder = local_folder(model, options)
        is_delta = folder is not None and is_delta_folder(folder)
        _check_role(model, role, is_delta)
        if not is_delta:
            continue
        delta = open_delta(folder)
        delta.check_files(hashes=True)
        target_config = target.config(trust_remote_code=options.trust_remote_code)
        vocabulary = _vocabulary_tensors(delta.config, target_config)
        _check_against_target(delta.config, str(model), target, target_config, vocabulary, options)
        _check_vocabulary_alignment(
            config, model, delta.config, vocabulary, target, target_config, roles, options
        )


def _check_against_target(
    delta: DeltaConfig,
    name: str,
    target: ModelReference,
    target_config,
    vocabulary: set[str],
    options: MergeOptions,
) -> None:
    from safetensors import safe_open

    source = f"{delta.finetuned.model} − {delta.base.model}"
    found = (target_config.model_type, list(target_config.architectures or []))
    if found != (delta.model_type, delta.architectures):
        raise DeltaError(
            f"delta {name} ({source}) is a {delta.model_type} "
            f"({', '.join(delta.architectures)}) delta but target {target} is {found[0]} "
            f"({', '.join(found[1])}). A delta only applies to a target of the architecture "
            "it was extracted from."
        )
    index = target.tensor_index(options.transformers_cache)
    shapes = {}
    for shard in set(index.tensor_paths.values()):
        if shard.endswith(".safetensors"):
            with safe_open(os.path.join(index.base_path, shard), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    shapes[key] = list(handle.get_slice(key).get_shape())
    for tensor_name, info in delta.tensors.items():
        shape = shapes.get(tensor_name)
        if shape is None or shape == info.shape:
            continue
        if tensor_name in vocabulary and shape[1:] == info.shape[1:]:
            continue  # rows are matched by token (see _check_vocabulary_alignment)
        raise DeltaError(
            f"{tensor_name} is {info.shape} in delta {name} ({source}) but {shape} in target "
            f"{target}. A delta only applies to a target of the same shapes: this target is "
            "another model size or configuration."
        )


def _vocabulary_tensors(delta: DeltaConfig, target_config) -> set[str]:
    """Tensors whose rows are vocabulary: marked at extraction, or whose row counts are
    the two vocabulary sizes."""
    vocabulary_sizes = {
        delta.source_config.get("vocab_size"),
        target_config.get_text_config().vocab_size,
    }
    return {
        name
        for name, info in delta.tensors.items()
        if info.vocabulary_axis == 0 or (info.shape and info.shape[0] in vocabulary_sizes)
    }


def _check_vocabulary_alignment(
    config: MergeConfiguration,
    model: ModelReference,
    delta: DeltaConfig,
    vocabulary_names: set[str],
    target: ModelReference,
    target_config,
    roles: Mapping[ModelReference, str],
    options: MergeOptions,
) -> None:
    """A delta's stored rows are in its own (the fine-tuned model's) token order. Where the
    output's rows differ from the target's, or the delta holds full rows or exact
    corrections of vocabulary rows, its rows must reach the method unpermuted: the delta
    must be the tokenizer source, or its vocabulary must be the output's."""
    source = _tokenizer_source(config)
    target_rows = target_config.get_text_config().vocab_size
    vocabulary = [delta.tensors[name] for name in sorted(vocabulary_names)]
    rows_differ = any(info.shape[0] != target_rows for info in vocabulary)
    needs_order = rows_differ or any(info.full_rows or info.corrections for info in vocabulary)
    if source is None:
        if rows_differ:
            raise DeltaError(
                f"delta {model} has {vocabulary[0].shape[0]} vocabulary rows but target "
                f"{target} has {target_rows}: add `tokenizer: {{source: {model}}}` to the "
                "recipe so that rows are matched by token, and the fine-tuned model's "
                "tokenizer and chat template (stored in the delta) are used."
            )
        return
    if source == model:
        return
    own = _vocabulary(model, options)
    if source == "union":
        others = [target, *roles]
        if any(_vocabulary(other, options) != own for other in others if other != model):
            raise DeltaError(
                f"delta {model}: with `tokenizer: {{source: union}}` the output's vocabulary "
                f"differs from the delta's, and mergekit would reorder or fill its rows. Use "
                f"`tokenizer: {{source: {model}}}`."
            )
        return
    output = _vocabulary(target if source == "base" else source, options)
    missing = [token for token in output if token not in own]
    if missing:
        raise DeltaError(
            f"delta {model} lacks {len(missing)} token(s) of the output's vocabulary (the "
            f"tokenizer source {source}), e.g. {', '.join(map(repr, missing[:3]))}: mergekit "
            "would fill the delta's rows for them with another model's embedding, which would "
            f"be added as a delta. Use `tokenizer: {{source: {model}}}`."
        )
    if needs_order and any(own[token] != index for token, index in output.items()):
        raise DeltaError(
            f"delta {model} stores exact vocabulary rows in its own token order, which the "
            f"tokenizer source {source} would change. Use `tokenizer: {{source: {model}}}`."
        )


def _tokenizer_source(config: MergeConfiguration):
    if config.tokenizer is not None:
        return config.tokenizer.source
    return config.tokenizer_source


def _vocabulary(model: ModelReference, options: MergeOptions) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        local_folder(model, options), trust_remote_code=options.trust_remote_code
    ).get_vocab()


def refuse_in_other_methods(models: Iterable[ModelReference]) -> None:
    """A delta folder is not a model: only ``finetuning_transfer`` can apply it."""
    for model in models:
        path = str(model.model.path)
        if os.path.isdir(path) and is_delta_folder(path):
            raise DeltaError(
                f"{model} is a delta folder (fine-tuned − base), not a model; only "
                "`merge_method: finetuning_transfer` applies it, as an input with "
                "`parameters: {role: delta}`."
            )
