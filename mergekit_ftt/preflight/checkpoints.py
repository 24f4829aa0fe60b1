"""What each input's weight files hold, read from their headers: names, shapes, dtypes.

safetensors headers are read with ``safe_open``; pickled ``.bin`` files are memory-mapped
(only their index is read). A missing, truncated or unreadable file is refused with its
name and the fix, and so are integer weights where floating-point ones are merged.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, replace

import torch
from mergekit.common import ModelReference, dtype_from_name
from mergekit.options import MergeOptions
from safetensors import SafetensorError, safe_open

from mergekit_ftt import METHOD_NAME
from mergekit_ftt.errors import FinetuningTransferError
from mergekit_ftt.sources import WEIGHT_FILES, weights_file

MAX_LISTED = 5


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


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as its weight file stores it."""

    shape: tuple[int, ...] | None  # None: not known (a legacy, non-zip .bin file)
    dtype: torch.dtype | None  # None: not known (legacy .bin, or a dtype torch lacks)
    file: str  # the shard, relative to the model folder


@dataclass(frozen=True)
class StoredCheckpoint:
    """The weights of one input as stored: names, shapes and dtypes, from headers only.

    For ``BASE+ADAPTER`` inputs these are the base model's names and shapes with the
    dtypes of the copy mergekit merges the adapter into (``--lora-merge-dtype``, else the
    base's own): that copy, in ``--lora-merge-cache``, is what the merge reads.
    """

    model: ModelReference
    folder: str
    tensors: dict[str, StoredTensor]

    @property
    def dtypes(self) -> set[torch.dtype]:
        """The floating-point dtypes the weights are stored in."""
        return {t.dtype for t in self.tensors.values() if t.dtype and t.dtype.is_floating_point}


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
        note(
            f"mergekit merges the adapter of {model} into its {name} base in {name}, which "
            f"rounds the adapter's update to {name} before the delta is taken; "
            "--lora-merge-dtype float32 keeps it (use a new --lora-merge-cache folder: "
            "mergekit reuses a merged copy whatever its dtype).",
            options,
        )
    return tensors


def _shards(model: ModelReference, folder: str) -> list[str]:
    found = weights_file(folder)
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
            f"{', '.join(missing[:MAX_LISTED])}. The download or copy is incomplete: fetch "
            f"the missing files again{_hub_fetch_hint(model, missing)}."
        )
    return shards


def _described(model: ModelReference, folder: str) -> str:
    """The model as the recipe names it, with the folder it was found in if that differs."""
    return str(model) if str(model.model.path) == folder else f"{model} ({folder})"


def _hub_fetch_hint(model: ModelReference, files: list[str]) -> str:
    if os.path.exists(model.model.path):
        return ""
    return f" (`hf download {model.model.path} {' '.join(files[:MAX_LISTED])}`)"


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
        note(
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


def check_floating_point(checkpoints: dict[ModelReference, StoredCheckpoint]) -> None:
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


def _first_line(error: BaseException) -> str:
    """``Type: message``, cut to its first line or sentence, without a final full stop."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if len(text) > 160 and ". " in text:
        text = text[: text.index(". ")]
    return f"{type(error).__name__}: {text.rstrip('.')}"


def note(message: str, options: MergeOptions) -> None:
    """One line for the user on stderr, beside mergekit's own output (not with --quiet)."""
    if not options.quiet:
        print(f"mergekit-ftt: {message}", file=sys.stderr, flush=True)
