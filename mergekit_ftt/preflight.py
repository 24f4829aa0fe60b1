"""Checks of a ``finetuning_transfer`` merge before anything is read in full or written.

mergekit 0.1.5 resolves per-model parameters tensor by tensor and only compares shapes
when a tensor is merged, so a wrong role, a damaged file or a model it cannot download
would surface late, after shards have been written, or as a long traceback.
:func:`check_merge` reads only the recipe, configs, tensor indexes and weight-file headers
(safetensors headers; pickled ``.bin`` files memory-mapped, not read), and raises
:class:`FinetuningTransferError` naming the model or file and the fix. The start-up hook
runs it at the top of mergekit's ``run_merge`` and merges the configuration it returns.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from mergekit.common import ModelPath, ModelReference, dtype_from_name
from mergekit.config import MergeConfiguration
from mergekit.merge_methods.base import ParameterScope
from mergekit.options import MergeOptions
from pydantic import BaseModel
from safetensors import SafetensorError, safe_open
from transformers import PretrainedConfig

from mergekit_ftt import METHOD_NAME, hub
from mergekit_ftt.merge_methods.finetuning_transfer import (
    FinetuningTransferError,
    Role,
    finetuning_transfer,
    split_roles,
)
from mergekit_ftt.precision import plan_precision

_MAX_LISTED = 5

# mergekit's order of preference (mergekit.io.lazy_tensor_loader.ShardedTensorIndex).
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)

# The dtypes of safetensors headers; a name not listed (a newer format) reads as None.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

# Keys people copy from mergekit's other methods, and what to do instead.
_KEY_HINTS = {
    "lambda": "Scale a delta with its model's `weight` (the paper's α) instead of `lambda`.",
    "int8_mask": "`int8_mask` only sets the dtype of mergekit's TIES sign mask: remove it.",
    "t": "`t` belongs to SLERP: chain a SLERP after the transfer with mergekit-multi.",
}


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as its weight file stores it."""

    shape: tuple[int, ...] | None  # None: not known (a legacy, non-zip .bin file)
    dtype: torch.dtype | None  # None: not known (legacy .bin, or a dtype torch lacks)
    file: str  # the shard, relative to the model folder


@dataclass(frozen=True)
class StoredCheckpoint:
    """The weights of one input as stored: names, shapes and dtypes, from headers only.

    For ``BASE+ADAPTER`` inputs these are the base model's files: mergekit merges the
    adapter into them first (``--lora-merge-cache``), with the same names and shapes.
    """

    model: ModelReference
    folder: str
    tensors: dict[str, StoredTensor]

    @property
    def dtypes(self) -> set[torch.dtype]:
        """The floating-point dtypes the weights are stored in."""
        return {t.dtype for t in self.tensors.values() if t.dtype and t.dtype.is_floating_point}


def check_merge(
    config: MergeConfiguration, out_path: str, options: MergeOptions
) -> MergeConfiguration:
    """Return the configuration to merge, or raise :class:`FinetuningTransferError`.

    Other merge methods pass through unchanged.
    """
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
    check_parameter_keys(config)
    _check_lora_cache(config, options)
    for reference in _referenced_models(config):
        locate(reference)
    models = [target, source_base, *finetuned]
    configs = {m: m.config(trust_remote_code=options.trust_remote_code) for m in models}
    _check_architectures(configs)
    checkpoints = {m: read_checkpoint(m, options) for m in models}
    _check_floating_point(checkpoints)
    allow_vocabulary = config.tokenizer is not None or config.tokenizer_source is not None
    _check_tensors(checkpoints, configs, finetuned, allow_vocabulary)
    plan = plan_precision(
        config, {model: _safetensors_names(c.dtypes) for model, c in checkpoints.items()}
    )
    if plan.message:
        print(plan.message, file=sys.stderr)
    return _card_safe_paths(plan.config)


def check_output_path(out_path: str) -> None:
    """Refuse to write into a folder that already holds a finished model."""
    if (Path(out_path) / "config.json").exists():
        raise FinetuningTransferError(
            f"{out_path} already holds a model (config.json). mergekit would overwrite it "
            "in place; choose a new output folder or delete this one first."
        )


def check_parameter_keys(config: MergeConfiguration) -> None:
    """Refuse recipe keys the method does not read: mergekit would ignore them silently."""
    merge_wide, per_model = _method_parameters()
    for where, parameters in _merge_wide_parameters(config):
        _refuse_unread(set(parameters or {}) - {*merge_wide, *per_model}, where)
    for model, parameters in _inputs(config):
        if model != config.base_model:  # the target's entry: see _configured_roles
            _check_model_keys(model, parameters or {})
    _check_sparsification_settings(config)


def _method_parameters() -> tuple[list[str], list[str]]:
    """The method's (merge-wide, per-model) parameter names, in the kernel's order.

    Per-model parameters may also be set at the top level, as defaults for every model.
    """
    parameters = finetuning_transfer.spec.parameters
    merge_wide = [p.name for p in parameters if p.scope == ParameterScope.SHARED]
    return merge_wide, [p.name for p in parameters if p.scope != ParameterScope.SHARED]


def _check_model_keys(model: ModelReference, parameters: dict) -> None:
    keys = set(parameters)
    merge_wide, per_model = _method_parameters()
    misplaced = sorted(keys & set(merge_wide))
    if misplaced:
        raise FinetuningTransferError(
            f"{', '.join(f'`{k}`' for k in misplaced)} under model {model} is a setting of "
            "the whole merge, which mergekit reads only from the top-level `parameters:`: "
            "move it there."
        )
    extra = sorted(keys - {"role"})
    if parameters.get("role") == Role.source_base.value and extra:
        raise FinetuningTransferError(
            f"model {model} is the source_base and takes only `role`, but has "
            f"{', '.join(f'`{k}`' for k in extra)}: the delta is finetuned − source_base, "
            "so `weight`, `density`, … go on each source_finetuned model."
        )
    _refuse_unread(keys - set(per_model), f"the parameters of {model}")


# Read only together with a `sparsification_method`; without one they change nothing.
_SPARSIFICATION_SETTINGS = ("density", "rescale", "gamma", "epsilon")


def _check_sparsification_settings(config: MergeConfiguration) -> None:
    merge_wide = [parameters or {} for _, parameters in _merge_wide_parameters(config)]
    if any(p.get("sparsification_method") is not None for p in merge_wide):
        return
    given = {
        key
        for parameters in [*merge_wide, *(p or {} for _, p in _inputs(config))]
        for key in _SPARSIFICATION_SETTINGS
        if key in parameters
    }
    if given:
        raise FinetuningTransferError(
            f"{', '.join(f'`{k}`' for k in sorted(given))} "
            f"{'takes' if len(given) == 1 else 'take'} effect only with a "
            "`sparsification_method` in the top-level `parameters:` (`magnitude` as in "
            "TIES, `random` as in DARE, `magnitude_outliers`, `della_magprune`); without "
            "one the whole delta is transferred. Add one, or remove them."
        )


def _refuse_unread(keys: set[str], where: str) -> None:
    if not keys:
        return
    merge_wide, per_model = _method_parameters()
    hints = []
    for key in sorted(keys):
        if key in _KEY_HINTS:
            hints.append(_KEY_HINTS[key])
        elif close := difflib.get_close_matches(key, [*merge_wide, *per_model], n=1):
            hints.append(f"Did you mean `{close[0]}` for `{key}`?")
    raise FinetuningTransferError(
        f"{METHOD_NAME} does not read {', '.join(f'`{k}`' for k in sorted(keys))} in "
        f"{where}; mergekit would ignore {'it' if len(keys) == 1 else 'them'} silently. "
        f"It reads, in the top-level `parameters:`, {', '.join(merge_wide)}; per model, "
        f"{', '.join(per_model)}." + "".join(f" {hint}" for hint in hints)
    )


def _merge_wide_parameters(config: MergeConfiguration) -> Iterator[tuple[str, dict | None]]:
    yield "the top-level `parameters:`", config.parameters
    for output_slice in config.slices or []:
        yield "a slice's `parameters:`", output_slice.parameters
    for name, module in (config.modules or {}).items():
        yield f"the `parameters:` of module {name}", module.parameters
        for output_slice in module.slices or []:
            yield f"a slice's `parameters:` in module {name}", output_slice.parameters


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
            if parameters:
                raise FinetuningTransferError(
                    f"{model} is base_model, the target, and takes no parameters, but has "
                    f"{', '.join(f'`{k}`' for k in sorted(parameters))}: `weight` and the "
                    "sparsification settings go on each source_finetuned model."
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


def _referenced_models(config: MergeConfiguration) -> list[ModelReference]:
    """Every model the merge reads, in recipe order: target, inputs, tokenizer sources."""
    models = [config.base_model] if config.base_model is not None else []
    models += [model for model, _ in _inputs(config)]
    models += [s.base_model for s in config.slices or [] if s.base_model is not None]
    if isinstance(config.tokenizer_source, ModelReference):
        models.append(config.tokenizer_source)
    if config.tokenizer is not None:
        if isinstance(config.tokenizer.source, ModelReference):
            models.append(config.tokenizer.source)
        for token in (config.tokenizer.tokens or {}).values():
            source = getattr(token.source, "model", token.source)
            if isinstance(source, ModelReference):
                models.append(source)
    return list(dict.fromkeys(models))


def _check_lora_cache(config: MergeConfiguration, options: MergeOptions) -> None:
    if options.lora_merge_cache:
        return
    for model in _referenced_models(config):
        if model.lora is not None:
            raise FinetuningTransferError(
                f"{model} is the LoRA adapter {model.lora} on {model.model}: mergekit merges "
                "the adapter into its base first and keeps that merged copy in a folder you "
                "choose. Add `--lora-merge-cache DIR` to the command (for example "
                "`--lora-merge-cache ~/.cache/mergekit-lora`; later merges reuse it)."
            )


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
    if not _is_repo_id(name):
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


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def read_checkpoint(model: ModelReference, options: MergeOptions) -> StoredCheckpoint:
    """Names, shapes and dtypes of ``model``'s weights, from its files' headers.

    Raises with the file and the fix when a file is missing, truncated or unreadable.
    """
    weights = ModelReference(model=model.model)  # a LoRA input: its base's files
    folder = weights.local_path(cache_dir=options.transformers_cache)
    tensors: dict[str, StoredTensor] = {}
    for shard in _shards(model, folder):
        tensors.update(_read_shard(model, folder, shard, options))
    if model.lora is not None:
        tensors = _as_merged_with_adapter(model, tensors, options)
    return StoredCheckpoint(model=model, folder=folder, tensors=tensors)


def _as_merged_with_adapter(
    model: ModelReference, tensors: dict[str, StoredTensor], options: MergeOptions
) -> dict[str, StoredTensor]:
    """The dtypes of the copy mergekit saves after merging the adapter into its base.

    mergekit loads the base in ``--lora-merge-dtype``, else in its stored dtype, merges
    the adapter (``merge_and_unload``) and saves that copy. A 16-bit copy has rounded
    the adapter's update ``scaling · B @ A`` to 16 bits before the delta is taken.
    """
    if options.lora_merge_dtype:
        dtype = dtype_from_name(options.lora_merge_dtype)
        return {
            name: replace(tensor, dtype=dtype)
            if tensor.dtype is not None and tensor.dtype.is_floating_point
            else tensor
            for name, tensor in tensors.items()
        }
    narrow = {t.dtype for t in tensors.values() if t.dtype in (torch.bfloat16, torch.float16)}
    if narrow:
        name = str(min(narrow, key=str)).removeprefix("torch.")
        _note(
            f"mergekit merges the adapter of {model} into its {name} base in {name}, which "
            f"rounds the adapter's update to {name} before the delta is taken; "
            "--lora-merge-dtype float32 keeps it (use a new --lora-merge-cache folder: "
            "mergekit reuses a merged copy whatever its dtype).",
            options,
        )
    return tensors


def _shards(model: ModelReference, folder: str) -> list[str]:
    found = next((f for f in WEIGHT_FILES if os.path.exists(os.path.join(folder, f))), None)
    if found is None:
        raise FinetuningTransferError(
            f"{_described(model, folder)} has no weights: mergekit reads "
            f"{', '.join(WEIGHT_FILES)}. "
            "Save the model with `save_pretrained` or download its weight files too."
        )
    if not found.endswith(".index.json"):
        return [found]
    index = os.path.join(folder, found)
    try:
        with open(index, encoding="utf-8") as file:
            shards = sorted(set(json.load(file)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise FinetuningTransferError(
            f"{index} is not a readable weight index ({type(error).__name__}: {error}): "
            "download or copy it again."
        ) from None
    missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if missing:
        raise FinetuningTransferError(
            f"{index} lists {len(missing)} shard(s) that are not in {folder}: "
            f"{', '.join(missing[:_MAX_LISTED])}. The download or copy is incomplete: fetch "
            f"the missing files again{_hub_fetch_hint(model, missing)}."
        )
    return shards


def _described(model: ModelReference, folder: str) -> str:
    """The model as the recipe names it, with the folder it was found in if that differs."""
    return str(model) if str(model.model.path) == folder else f"{model} ({folder})"


def _hub_fetch_hint(model: ModelReference, files: list[str]) -> str:
    if os.path.exists(model.model.path):
        return ""
    return f" (`hf download {model.model.path} {' '.join(files[:_MAX_LISTED])}`)"


def _read_shard(
    model: ModelReference, folder: str, shard: str, options: MergeOptions
) -> dict[str, StoredTensor]:
    path = os.path.join(folder, shard)
    try:
        if shard.endswith(".safetensors"):
            with safe_open(path, framework="pt") as file:
                return {
                    name: StoredTensor(
                        tuple(file.get_slice(name).get_shape()),
                        _SAFETENSORS_DTYPES.get(file.get_slice(name).get_dtype()),
                        shard,
                    )
                    for name in file.keys()  # noqa: SIM118 - safe_open is not a mapping
                }
        return _read_pickled_shard(path, shard, options)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as error:
        raise FinetuningTransferError(
            f"{path} (a weight file of {model}) cannot be read: {_first_line(error)}. It is "
            f"truncated or damaged: download or copy it again{_hub_fetch_hint(model, [shard])}."
        ) from None


def _read_pickled_shard(path: str, shard: str, options: MergeOptions) -> dict[str, StoredTensor]:
    """A ``torch.save`` file, memory-mapped (only its index is read), as mergekit reads it."""
    if not options.lazy_unpickle:
        _note(
            f"{path} is a pickled .bin file: mergekit loads each such file whole; "
            "--lazy-unpickle reads it tensor by tensor.",
            options,
        )
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        state = torch.load(path, map_location="meta", weights_only=True)  # legacy format
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"it holds a {type(state).__name__}, not a dict of tensors")
    return {
        name: StoredTensor(tuple(tensor.shape), tensor.dtype, shard)
        for name, tensor in state.items()
        if isinstance(tensor, torch.Tensor)
    }


def _safetensors_names(dtypes: set[torch.dtype]) -> set[str]:
    """safetensors' names of ``dtypes`` (``"BF16"``, ``"F32"``), as :func:`plan_precision`
    takes them."""
    names = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
    return {names[dtype] for dtype in dtypes if dtype in names}


def _first_line(error: BaseException) -> str:
    """``Type: message``, cut to its first line or sentence, without a final full stop."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if len(text) > 160 and ". " in text:
        text = text[: text.index(". ")]
    return f"{type(error).__name__}: {text.rstrip('.')}"


def _note(message: str, options: MergeOptions) -> None:
    """One line for the user on stderr, beside mergekit's own output (not with --quiet)."""
    if not options.quiet:
        print(f"mergekit-ftt: {message}", file=sys.stderr, flush=True)


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


def _check_floating_point(checkpoints: dict[ModelReference, StoredCheckpoint]) -> None:
    """Integer weights (a quantized checkpoint) would be cast and merged as numbers."""
    target, *_ = checkpoints
    merged = set(checkpoints[target].tensors)
    for model, checkpoint in checkpoints.items():
        integer = sorted(
            (name, tensor)
            for name, tensor in checkpoint.tensors.items()
            if name in merged and tensor.dtype is not None and not tensor.dtype.is_floating_point
        )
        if integer:
            name, tensor = integer[0]
            raise FinetuningTransferError(
                f"{model} stores {len(integer)} weight(s) as non-floating-point numbers, e.g. "
                f"{name} as {str(tensor.dtype).removeprefix('torch.')} in "
                f"{os.path.join(checkpoint.folder, tensor.file)}. {METHOD_NAME} adds and "
                "subtracts floating-point weights: use the unquantized model (a quantized "
                "checkpoint must be dequantized and saved in float first)."
            )


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
                f"{', '.join(missing[:_MAX_LISTED])}. All models must be complete "
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


def _card_safe_paths(config: MergeConfiguration) -> MergeConfiguration:
    """Write local folders such as ``models/ft`` as ``./models/ft``.

    mergekit's model card, written after the weights, asks the Hub whether a path with at
    most one '/' is a Hub repository, even when the folder exists. Without network that
    request fails after the weights and config.json are written, leaving a model without
    its tokenizer; with network the card may link someone else's repository.
    """
    renamed = {}
    for model in _referenced_models(config):
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
    ) and _is_repo_id(name)


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
