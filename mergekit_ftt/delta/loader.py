"""Let mergekit's tensor loader read delta folders, so ``role: delta`` runs in plain mergekit-yaml.

mergekit reads every input through ``ModelReference.lazy_loader()`` (a
``LazyTensorLoader``: an ``index.tensor_paths`` mapping and ``get_tensor``). A compressed
delta has no tensor of the model's shape on disk (a sign matrix is 1 bit per element,
a sparse one a mask and values), and mergekit requires every input of a merge to have the
target's shape before the method sees it, so the adapter (:mod:`mergekit_ftt.mergekit_adapter`)
wraps ``lazy_loader``: for a folder with ``delta_config.json`` it returns
:class:`DeltaTensorLoader`, which decodes each tensor when mergekit asks for it — one
tensor at a time, like the safetensors loader it stands in for. Every other model is
loaded by mergekit as before.

The merge method finds the folder of a delta input with :func:`delta_for`, for what a
decoded tensor cannot carry: the exact values of the elements a dense delta stores
rounded, and which vocabulary rows hold the fine-tuned model's own values.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from mergekit_ftt.delta.encode import decode
from mergekit_ftt.delta.format import DeltaFolder, is_delta_folder

_OPEN: dict[str, DeltaFolder] = {}
_BY_MODEL: dict[Hashable, DeltaFolder] = {}
_LOCK = threading.Lock()


def open_delta(path: str | os.PathLike) -> DeltaFolder:
    """The delta folder at ``path``, opened once per process."""
    key = os.path.realpath(path)
    with _LOCK:
        if key not in _OPEN:
            _OPEN[key] = DeltaFolder(key)
        return _OPEN[key]


def delta_for(model: Hashable) -> DeltaFolder | None:
    """The delta folder behind a merge input (a ``ModelReference``), or None."""
    folder = _BY_MODEL.get(model)
    if folder is not None:
        return folder
    path = getattr(getattr(model, "model", None), "path", None)
    if path is not None and os.path.isdir(path) and is_delta_folder(path):
        return open_delta(path)
    return None


@dataclass
class DeltaIndex:
    """The part of mergekit's ``ShardedTensorIndex`` that its loaders and planner read."""

    base_path: str
    tensor_paths: dict[str, str]
    is_safetensors: bool = True
    shards: list = field(default_factory=list)


class DeltaTensorLoader:
    """Stands in for mergekit's ``LazyTensorLoader`` on a delta folder."""

    def __init__(self, folder: DeltaFolder):
        self.folder = folder
        self.index = DeltaIndex(
            base_path=str(folder.path),
            tensor_paths={
                name: next(iter(info.components.values())).file
                for name, info in folder.config.tensors.items()
            },
        )

    def get_tensor(self, key, device="cpu", aliases=None, raise_on_missing=True):
        if key not in self.index.tensor_paths:
            key = next((a for a in aliases or () if a in self.index.tensor_paths), key)
        if key not in self.index.tensor_paths:
            if raise_on_missing:
                raise KeyError(key)
            return None
        return decode(self.folder, key).to(device)

    def flush(self) -> None:
        self.folder.close()


def delta_loader(model: Hashable, path: str) -> DeltaTensorLoader | None:
    """The loader of input ``model`` if its folder ``path`` is a delta folder, else None
    (what :mod:`mergekit_ftt.mergekit_adapter` asks ``ModelReference.lazy_loader``)."""
    if not is_delta_folder(path):
        return None
    folder = open_delta(path)
    _BY_MODEL[model] = folder
    return DeltaTensorLoader(folder)


@dataclass(frozen=True)
class StoredDelta:
    """A ``role: delta`` input as ``finetuning_transfer`` uses it: Δ as mergekit loaded it
    (possibly cut to the output's vocabulary rows) and, from its folder, the exact values
    of the elements stored rounded and the rows that hold the fine-tuned model's own
    values (tokens the base lacks: they are copied to the output as they are)."""

    tensor: torch.Tensor
    corrections: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()  # (flat index, value)
    full_rows: tuple[int, ...] = ()

    def correct(self, chunk: torch.Tensor, start: int) -> None:
        """Overwrite the rounded elements of ``chunk`` (flat elements from ``start``)."""
        bounds = torch.tensor([start, start + chunk.numel()], dtype=torch.int64)
        for index, value in self.corrections:
            low, high = torch.searchsorted(index, bounds).tolist()
            if high > low:
                chunk[index[low:high] - start] = value[low:high].to(chunk.dtype)

    def exact(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The whole Δ in ``dtype``, corrections applied."""
        tensor = self.tensor.to(dtype, copy=True)
        self.correct(tensor.view(-1), 0)
        return tensor

    def exact_rows(self) -> torch.Tensor:
        """The full rows, float64, corrections applied: ``[len(full_rows), row elements]``."""
        rows = self.tensor.reshape(self.tensor.shape[0], -1)
        values = rows[list(self.full_rows)].to(torch.float64)
        row_elements = rows.shape[1]
        position = {row: place for place, row in enumerate(self.full_rows)}
        wanted = torch.tensor(self.full_rows, dtype=torch.int64)
        for index, value in self.corrections:
            hit = torch.isin(torch.div(index, row_elements, rounding_mode="floor"), wanted)
            for flat, exact in zip(index[hit].tolist(), value[hit].tolist(), strict=True):
                values[position[flat // row_elements], flat % row_elements] = exact
        return values


def stored_delta(model: Hashable, tensor: torch.Tensor, name: str | None) -> StoredDelta:
    """What the kernel needs of delta input ``model`` for the loaded ``tensor`` ``name``.

    The loaded tensor can have fewer rows than stored (mergekit keeps the rows of the
    tokenizer's vocabulary); rows keep their index, so corrections and full rows beyond
    the loaded rows are dropped. Without its folder (a tensor given directly to
    ``merge_tensors``) the tensor is taken as Δ itself.
    """
    folder = delta_for(model)
    if folder is None or name not in folder.config.tensors:
        return StoredDelta(tensor)
    info = folder.info(name)
    rows = tensor.shape[0] if tensor.dim() else 1
    full_rows = tuple(row for row in info.full_rows if row < rows)
    corrections = folder.corrections(name)
    if tensor.numel() < math.prod(info.shape):  # rows cut to the output's vocabulary
        corrections = [(i[i < tensor.numel()], v[i < tensor.numel()]) for i, v in corrections]
    return StoredDelta(tensor, tuple(corrections), full_rows)
