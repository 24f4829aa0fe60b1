"""Checks of a ``finetuning_transfer`` merge before anything is read in full or written.

mergekit 0.1.5 resolves per-model parameters tensor by tensor and only compares shapes
when a tensor is merged, so a wrong role or a mismatched checkpoint would surface late,
after shards have been written. :func:`check_merge` reads only configs, tensor indexes
and safetensors headers, and raises :class:`FinetuningTransferError` naming the models
and the fix. The start-up hook runs it at the top of mergekit's ``run_merge``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from safetensors import safe_open
from transformers import PretrainedConfig

from mergekit_ftt import METHOD_NAME
from mergekit_ftt.merge_methods.finetuning_transfer import FinetuningTransferError, split_roles
from mergekit_ftt.precision import plan_precision

_MAX_LISTED = 5


def check_merge(
    config: MergeConfiguration, out_path: str, options: MergeOptions
) -> MergeConfiguration:
    """Raise :class:`FinetuningTransferError` if this merge cannot succeed as configured;
    return the configuration to run (its precision chosen by :mod:`mergekit_ftt.precision`)."""
    if config.merge_method != METHOD_NAME:
        return config
    check_output_path(out_path)
    target = config.base_model
    if target is None:
        raise FinetuningTransferError(
            f"{METHOD_NAME} needs `base_model:` set to the target model, the model that "
            "receives the transferred delta."
        )
    roles = _configured_roles(config, target)
    source_base, finetuned = split_roles(roles)
    models = [target, source_base, *finetuned]
    configs = {m: m.config(trust_remote_code=options.trust_remote_code) for m in models}
    _check_architectures(configs)
    allow_vocabulary = config.tokenizer is not None or config.tokenizer_source is not None
    headers = {model: _tensor_headers(model, options) for model in models}
    _check_tensors(configs, finetuned, headers, allow_vocabulary)
    plan = plan_precision(
        config,
        {model: {dtype for _, dtype in header.values()} for model, header in headers.items()},
    )
    if plan.message:
        print(plan.message, file=sys.stderr)
    return plan.config


def check_output_path(out_path: str) -> None:
    """Refuse to write into a folder that already holds a finished model."""
    if (Path(out_path) / "config.json").exists():
        raise FinetuningTransferError(
            f"{out_path} already holds a model (config.json). mergekit would overwrite it "
            "in place; choose a new output folder or delete this one first."
        )


def _configured_roles(config: MergeConfiguration, target: ModelReference) -> dict:
    roles: dict[ModelReference, object] = {}
    for model, parameters in _inputs(config):
        role = (parameters or {}).get("role")
        if model == target:
            if role is not None:
                raise FinetuningTransferError(
                    f"{model} is base_model, the target, and takes no role; the source "
                    "base model it was trained from is a separate entry with "
                    "`role: source_base`."
                )
            continue
        if role is None:
            raise FinetuningTransferError(
                f"model {model} has no role: give it `parameters: {{role: source_finetuned}}` "
                f"(a fine-tuned model whose delta is transferred) or "
                f"`parameters: {{role: source_base}}` (the model it was fine-tuned from)."
            )
        if roles.get(model, role) != role:
            raise FinetuningTransferError(f"model {model} is listed with two roles.")
        roles[model] = role
    return roles


def _inputs(config: MergeConfiguration) -> Iterator[tuple[ModelReference, dict | None]]:
    for model_in in config.models or []:
        yield model_in.model, model_in.parameters
    for output_slice in config.slices or []:
        for source in output_slice.sources:
            yield source.model, source.parameters
    for module in (config.modules or {}).values():
        for model_in in module.models or []:
            yield model_in.model, model_in.parameters
        for output_slice in module.slices or []:
            for source in output_slice.sources:
                yield source.model, source.parameters


def _check_architectures(configs: dict[ModelReference, PretrainedConfig]) -> None:
    target, *others = configs
    expected = _architecture(configs[target])
    for model in others:
        found = _architecture(configs[model])
        if found != expected:
            raise FinetuningTransferError(
                f"{METHOD_NAME} needs models of one architecture: target {target} is "
                f"{expected[0]} ({expected[1]}) but {model} is {found[0]} ({found[1]}). "
                "A fine-tuning delta only transfers between models of the same shape."
            )


def _architecture(config: PretrainedConfig) -> tuple[str, str]:
    return config.model_type, ",".join(config.architectures or [])


def _check_tensors(
    configs: dict[ModelReference, PretrainedConfig],
    finetuned: list[ModelReference],
    headers: dict[ModelReference, dict[str, tuple[tuple[int, ...], str]]],
    allow_vocabulary: bool,
) -> None:
    if any(model.lora for model in configs):
        return  # LoRA inputs are merged by mergekit first; their shapes are known only then
    target, *others = configs
    shapes = {
        model: {name: shape for name, (shape, _) in header.items()}
        for model, header in headers.items()
    }
    vocab = {model: config.get_text_config().vocab_size for model, config in configs.items()}
    tied = {
        model: getattr(config, "tie_word_embeddings", False) for model, config in configs.items()
    }
    for model in others:
        missing = sorted(
            name
            for name in set(shapes[target]) - set(shapes[model])
            if not (name == "lm_head.weight" and tied[model])
        )
        if missing:
            raise FinetuningTransferError(
                f"{model} lacks {len(missing)} tensor(s) that target {target} has, e.g. "
                f"{', '.join(missing[:_MAX_LISTED])}. All models must be complete "
                "checkpoints of the same architecture."
            )
        for name, target_shape in shapes[target].items():
            shape = shapes[model].get(name)
            if shape is None or shape == target_shape or not shape or not target_shape:
                continue  # absent, equal, or unknown (.bin shards are not read)
            if _is_vocabulary_mismatch(target_shape, shape, vocab[target], vocab[model]):
                if allow_vocabulary:
                    continue
                fix = finetuned[0] if model not in finetuned else model
                raise FinetuningTransferError(
                    f"{name} has {shape[0]} vocabulary rows in {model} but {target_shape[0]} "
                    f"in target {target}. Add `tokenizer: {{source: {fix}}}` to the recipe so "
                    "that rows are aligned by token and tokens only the fine-tuned model has "
                    "keep its rows (and its tokenizer and chat template are used)."
                )
            raise FinetuningTransferError(
                f"{name} has shape {list(shape)} in {model} but {list(target_shape)} in target "
                f"{target}. A fine-tuning delta only transfers between models of the same "
                "shape (vocabulary rows aside)."
            )


def _is_vocabulary_mismatch(
    a: tuple[int, ...], b: tuple[int, ...], vocab_a: int | None, vocab_b: int | None
) -> bool:
    if len(a) != len(b):
        return False
    differing = [axis for axis in range(len(a)) if a[axis] != b[axis]]
    return len(differing) == 1 and {a[differing[0]], b[differing[0]]} == {vocab_a, vocab_b}


def _tensor_headers(
    model: ModelReference, options: MergeOptions
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each tensor's shape and stored dtype (safetensors' name, e.g. ``"BF16"``) from the
    safetensors headers; ``((), "")`` for tensors in .bin files, which are not read."""
    if model.lora:
        return {}
    index = model.tensor_index(options.transformers_cache)
    headers = dict.fromkeys(index.tensor_paths, ((), ""))
    for shard in set(index.tensor_paths.values()):
        if not shard.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(index.base_path, shard), framework="pt") as file:
            for name in file.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = file.get_slice(name)
                headers[name] = (tuple(tensor.get_shape()), tensor.get_dtype())
    return headers
