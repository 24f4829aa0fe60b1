"""Checks of a ``finetuning_transfer`` merge before anything is read in full or written.

mergekit 0.1.5 resolves per-model parameters tensor by tensor and only compares shapes
when a tensor is merged, so a wrong role, a damaged file or a model it cannot download
would surface late, after shards have been written, or as a long traceback.
:func:`check_merge` reads only the recipe, configs, tensor indexes and weight-file headers
(safetensors headers; pickled ``.bin`` files memory-mapped, not read), and raises
:class:`FinetuningTransferError` naming the model or file and the fix. The start-up hook
runs it at the top of mergekit's ``run_merge`` and merges the configuration it returns.

- :mod:`.recipe`: roles, the keys the method reads, the models the recipe names;
- :mod:`.models`: where each model is (local folder or reachable Hub repository);
- :mod:`.checkpoints`: what the weight files hold (:class:`StoredCheckpoint`, with each
  tensor's shape and stored dtype, which :mod:`mergekit_ftt.precision` plans with);
- here: the order of the checks, and those that compare the models with each other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from transformers import PretrainedConfig

from mergekit_ftt import METHOD_NAME
from mergekit_ftt.delta.checks import (
    check_delta_inputs,
    check_delta_roles,
    delta_checkpoint,
    refuse_in_other_methods,
)
from mergekit_ftt.errors import FinetuningTransferError
from mergekit_ftt.merge_methods.finetuning_transfer import split_roles
from mergekit_ftt.precision import plan_precision
from mergekit_ftt.preflight.checkpoints import (
    MAX_LISTED,
    StoredCheckpoint,
    StoredTensor,
    check_floating_point,
    note,
    read_checkpoint,
)
from mergekit_ftt.preflight.models import card_safe_paths, locate_all
from mergekit_ftt.preflight.recipe import (
    check_lora_cache,
    check_parameter_keys,
    configured_roles,
    referenced_models,
)
from mergekit_ftt.vocabulary_rows import plan_rows

__all__ = [
    "StoredCheckpoint",
    "StoredTensor",
    "TransferInputs",
    "check_inputs",
    "check_merge",
    "check_output_path",
    "read_checkpoint",
    "referenced_models",
    "refuse_in_other_methods",
    "runnable_config",
]


def check_merge(
    config: MergeConfiguration, out_path: str, options: MergeOptions
) -> MergeConfiguration:
    """Return the configuration of a ``finetuning_transfer`` recipe to merge, or raise
    :class:`FinetuningTransferError`."""
    check_output_path(out_path)
    config, notes = runnable_config(config, options)
    for line in (notes or "").splitlines():
        note(line, options)
    return config


def runnable_config(
    config: MergeConfiguration, options: MergeOptions
) -> tuple[MergeConfiguration, str | None]:
    """The input checks of :func:`check_merge`: the configuration to merge and its notes
    (precision, vocabulary rows; None when there is nothing to say), or
    :class:`FinetuningTransferError`."""
    inputs = check_inputs(config, options)
    notes = [line for line in (inputs.precision_note, inputs.rows_note) if line]
    return card_safe_paths(inputs.config), "\n".join(notes) or None


class TransferInputs(NamedTuple):
    """A checked ``finetuning_transfer`` recipe: its models by role, what their weight files
    hold, and the configuration to run (precision chosen by :mod:`mergekit_ftt.precision`,
    with a note when it differs from the recipe's)."""

    target: ModelReference
    source_base: ModelReference | None  # None when every input is a stored delta
    source_finetuned: list[ModelReference]
    deltas: list[ModelReference]  # the ``role: delta`` folders
    checkpoints: dict[ModelReference, StoredCheckpoint]
    config: MergeConfiguration
    precision_note: str | None
    rows_note: str | None = None  # embedding rows added or dropped (vocabulary_rows)


def check_inputs(config: MergeConfiguration, options: MergeOptions) -> TransferInputs:
    """The input checks of :func:`check_merge` (no output folder): raise
    :class:`FinetuningTransferError` or return the models by role and the configuration to
    run. ``ftt-inspect`` calls this so that its errors are the merge's own."""
    target = config.base_model
    if target is None:
        raise FinetuningTransferError(
            f"{METHOD_NAME} needs `base_model:` set to the target model, the model that "
            "receives the transferred delta."
        )
    roles = configured_roles(config, target)
    inputs = split_roles(roles)
    check_delta_roles(config, target, roles)
    check_parameter_keys(config)
    check_lora_cache(config, options)
    locate_all(config)
    check_delta_inputs(config, target, roles, options)
    models = [target, *filter(None, [inputs.source_base]), *inputs.deltas]
    configs = {m: m.config(trust_remote_code=options.trust_remote_code) for m in models}
    _check_architectures(configs)
    checkpoints = {m: delta_checkpoint(m, options) or read_checkpoint(m, options) for m in models}
    check_floating_point(checkpoints)
    allow_vocabulary = config.tokenizer is not None or config.tokenizer_source is not None
    _check_tensors(checkpoints, configs, inputs.deltas, allow_vocabulary)
    plan = plan_precision(config, {model: c.dtypes for model, c in checkpoints.items()})
    planned, rows_note = plan_rows(plan.config, options)
    return TransferInputs(
        target,
        inputs.source_base,
        inputs.finetuned,
        [model for model in inputs.deltas if model in inputs.stored],
        checkpoints,
        planned,
        plan.message,
        rows_note,
    )


def check_output_path(out_path: str) -> None:
    """Refuse an output folder that holds anything: nothing a user had is overwritten.

    A transfer is written into a staging folder beside it and moved into place when it is
    complete (:class:`mergekit_ftt.outputs.StagedOutput`), so the output folder must not
    exist yet, or be empty. ``os.devnull`` stands for "no output" (ftt-sweep's in-memory
    variants).
    """
    out = Path(out_path)
    if out_path == os.devnull or not out.exists():
        return
    if (out / "config.json").exists():
        raise FinetuningTransferError(
            f"{out_path} already holds a model (config.json) that is not this recipe's "
            "merge; choose a new output folder or delete this one first."
        )
    if not out.is_dir() or any(out.iterdir()):
        raise FinetuningTransferError(
            f"{out_path} exists and is not an empty folder; a transfer is written into a new "
            "or empty folder, so that nothing there is overwritten. Choose another output "
            "folder or empty this one."
        )


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
    checkpoints: dict[ModelReference, StoredCheckpoint],
    configs: dict[ModelReference, PretrainedConfig],
    finetuned: list[ModelReference],
    allow_vocabulary: bool,
) -> None:
    target, *others = checkpoints
    shapes = {
        model: {name: tensor.shape for name, tensor in checkpoint.tensors.items()}
        for model, checkpoint in checkpoints.items()
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
                f"{', '.join(missing[:MAX_LISTED])}. All models must be complete "
                "checkpoints of the same architecture."
            )
        for name, target_shape in shapes[target].items():
            shape = shapes[model].get(name)
            if shape is None or target_shape is None or shape == target_shape:
                continue  # absent, unknown (legacy .bin) or equal
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
