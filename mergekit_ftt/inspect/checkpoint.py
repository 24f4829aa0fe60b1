"""One input model's safetensors shards, read tensor by tensor in chunks of rows."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from mergekit.common import ModelReference
from mergekit.options import MergeOptions
from safetensors import safe_open

from mergekit_ftt.cli import FttError
from mergekit_ftt.inspect.recipe import TensorSource


class Checkpoint:
    """The safetensors shards of one model: every tensor's shape and stored dtype from the
    headers, and a tensor's rows on demand. A shard is mapped only while one of its tensors
    is read, so the pages read leave the process's memory with it."""

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
        self._headers: dict[str, tuple[list[int], str]] = {}
        for path in set(self._paths.values()):
            with safe_open(path, framework="pt", device="cpu") as file:
                for name in file.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensor = file.get_slice(name)
                    self._headers[name] = (list(tensor.get_shape()), tensor.get_dtype())

    @property
    def names(self) -> list[str]:
        return list(self._paths)

    def resolve(self, source: TensorSource) -> str:
        """The first of the names mergekit accepts for this tensor that the model has."""
        for name in source.names:
            if name in self._paths:
                return name
        raise FttError(f"{self.model} has no tensor {source.names[0]}")

    def shape(self, name: str) -> list[int]:
        return self._headers[name][0]

    def dtype(self, name: str) -> str:
        """The stored dtype, as safetensors names it (``BF16``, ``F32``, ...)."""
        return self._headers[name][1]

    @contextlib.contextmanager
    def reading(self, name: str) -> Iterator:
        """The tensor's safetensors slice: ``slice[start:stop]`` reads rows start..stop-1."""
        with safe_open(self._paths[name], framework="pt", device="cpu") as file:
            yield file.get_slice(name)
