"""One input model of ``ftt-delta extract``, read through mergekit's own loader (Hub ids and
local folders alike), and the files of its tokenizer that a delta folder carries."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_ftt.delta.format import SourceModel, is_delta_folder
from mergekit_ftt.errors import DeltaError
from mergekit_ftt.sources import Wanted, require_models

TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


@dataclass
class Source:
    """One input model, read through mergekit's loader (Hub ids and local folders alike)."""

    given: str
    reference: object  # mergekit.common.ModelReference
    path: Path
    loader: object  # mergekit.io.LazyTensorLoader
    config: object  # transformers.PretrainedConfig
    digests: dict[str, Future] = field(default_factory=dict)

    @classmethod
    def open(cls, given: str) -> Source:
        """Open ``given`` (checked first with :func:`require_sources`)."""
        reference = model_reference(given)
        try:
            path = Path(reference.local_path())
            config = reference.config()
            loader = reference.lazy_loader(lazy_unpickle=True)
        except (OSError, RuntimeError, ValueError) as error:
            raise DeltaError(f"cannot read model {given}: {error}") from None
        return cls(given, reference, path, loader, config)

    def tokenizer_folder(self) -> Path:
        """Where its tokenizer files are: the folder itself, or a Hub snapshot of them
        (mergekit's download takes only weights and *.json)."""
        if Path(self.reference.model.path).exists():
            return self.path
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                self.reference.model.path,
                revision=self.reference.model.revision,
                allow_patterns=list(TOKENIZER_FILES),
            )
        )

    @property
    def names(self) -> set[str]:
        return set(self.loader.index.tensor_paths)

    def shape(self, name: str) -> tuple[int, ...] | None:
        """From the safetensors header (no data read); None for pickled shards."""
        shard = self.loader.index.tensor_paths[name]
        if not shard.endswith(".safetensors"):
            return None
        from safetensors import safe_open

        with safe_open(self.path / shard, framework="pt") as handle:
            return tuple(handle.get_slice(name).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        return self.loader.get_tensor(name)

    def describe(self, dtype: str, hashes: bool) -> SourceModel:
        weights_sha256 = None
        if hashes:
            lines = "".join(f"{n} {f.result()}\n" for n, f in sorted(self.digests.items()))
            weights_sha256 = hashlib.sha256(lines.encode()).hexdigest()
        parts = self.path.parts
        commit = parts[-1] if len(parts) > 2 and parts[-2] == "snapshots" else None
        given = self.reference.model.path
        return SourceModel(
            model=os.path.abspath(given) if Path(given).exists() else given,
            revision=self.reference.model.revision,
            commit=commit,
            weights_sha256=weights_sha256,
            dtype=dtype,
        )


def model_reference(given: str):
    """mergekit's reference to the model ``given`` (``ID@REVISION`` too); a delta folder
    or a LoRA adapter is refused: a delta is taken between two models."""
    from mergekit.common import ModelReference

    reference = ModelReference.parse(given)
    if is_delta_folder(reference.model.path):
        raise DeltaError(f"{given} is a delta folder, not a model; extract from the models.")
    if reference.lora is not None:
        raise DeltaError(
            f"{given}: LoRA adapters are not models; merge the adapter first "
            "(mergekit's `model+adapter` syntax needs --lora-merge-cache) or give the "
            "merged model."
        )
    return reference


def require_sources(*given: str) -> None:
    """Refuse, naming all of them at once, the models of ``given`` this machine cannot
    load, before any is read. mergekit's loader reads them, so a cached copy does not
    serve offline (it asks the Hub for the file list)."""
    references = [model_reference(name) for name in given]
    wanted = [Wanted(r.model.path, r.model.revision) for r in references]
    require_models(wanted, DeltaError, cache_suffices=False)


def tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """sha256 of a tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(f"{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
    digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()
