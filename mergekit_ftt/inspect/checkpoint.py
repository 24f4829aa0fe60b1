"""One input model's safetensors shards, read tensor by tensor in chunks of rows."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from safetensors import safe_open

from mergekit_ftt.errors import FttError
from mergekit_ftt.inspect.recipe import TensorSource
from mergekit_ftt.precision import dtype_name
from mergekit_ftt.preflight import StoredCheckpoint


class Checkpoint:
    """The weights of one input: names, shapes and stored dtypes as the merge's preflight
    read them from the headers, and a tensor's rows on demand. A shard is mapped only while
    one of its tensors is read, so the pages read leave the process's memory with it."""

    def __init__(self, stored: StoredCheckpoint):
        self.model = stored.model
        if stored.model.lora is not None:
            raise FttError(
                f"{stored.model} is a model with a LoRA adapter; ftt-inspect reads full weights. "
                "Merge the adapter into its base first (e.g. with mergekit's "
                "--lora-merge-cache) and give that folder in the recipe."
            )
        pickled = sorted({t.file for t in stored.tensors.values()} - self._safetensors(stored))
        if pickled:
            raise FttError(
                f"{stored.model} stores its weights as PyTorch .bin files ({pickled[0]}); "
                "ftt-inspect streams safetensors only. Convert it once (load with "
                "transformers and save_pretrained(..., safe_serialization=True)) and point "
                "the recipe at that."
            )
        self._stored = stored

    @staticmethod
    def _safetensors(stored: StoredCheckpoint) -> set[str]:
        return {t.file for t in stored.tensors.values() if t.file.endswith(".safetensors")}

    @property
    def names(self) -> list[str]:
        return list(self._stored.tensors)

    def resolve(self, source: TensorSource) -> str:
        """The first of the names mergekit accepts for this tensor that the model has."""
        for name in source.names:
            if name in self._stored.tensors:
                return name
        raise FttError(f"{self.model} has no tensor {source.names[0]}")

    def shape(self, name: str) -> list[int]:
        return list(self._stored.tensors[name].shape)

    def dtype(self, name: str) -> str:
        """The stored dtype's name (``bfloat16``, ``float32``, ...)."""
        return dtype_name(self._stored.tensors[name].dtype)

    @contextlib.contextmanager
    def reading(self, name: str) -> Iterator:
        """The tensor's safetensors slice: ``slice[start:stop]`` reads rows start..stop-1."""
        path = os.path.join(self._stored.folder, self._stored.tensors[name].file)
        with safe_open(path, framework="pt", device="cpu") as file:
            yield file.get_slice(name)
