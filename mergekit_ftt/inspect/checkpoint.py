"""One input model's safetensors shards, read tensor by tensor in chunks of rows."""

from __future__ import annotations

import os

import torch
from mergekit.common import ModelReference
from mergekit.options import MergeOptions
from safetensors import safe_open

from mergekit_ftt.cli import FttError
from mergekit_ftt.inspect.recipe import TensorSource


class Checkpoint:
    """The safetensors shards of one model, opened once, read as row chunks."""

    def __init__(self, model: ModelReference, options: MergeOptions):
        self.model = model
        index = model.tensor_index(options.transformers_cache)
        if not index.is_safetensors:
            raise FttError(
                f"{model} stores its weights as PyTorch .bin files; ftt-inspect streams "
                "safetensors only. Convert it once (load with transformers and "
                "save_pretrained(..., safe_serialization=True)) and point the recipe at that."
            )
        self._paths = {
            name: os.path.join(index.base_path, shard) for name, shard in index.tensor_paths.items()
        }
        self._files: dict[str, object] = {}

    @property
    def names(self) -> list[str]:
        return list(self._paths)

    def resolve(self, source: TensorSource) -> str:
        for name in source.names:
            if name in self._paths:
                return name
        raise FttError(f"{self.model} has no tensor {source.names[0]}")

    def _slice(self, name: str):
        path = self._paths[name]
        if path not in self._files:
            self._files[path] = safe_open(path, framework="pt", device="cpu")
        return self._files[path].get_slice(name)

    def shape(self, name: str) -> list[int]:
        return list(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._slice(name).get_dtype()

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        tensor_slice = self._slice(name)
        if not tensor_slice.get_shape():
            return tensor_slice[:]
        return tensor_slice[start:stop]
