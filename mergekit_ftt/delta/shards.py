"""The safetensors shards of a delta folder, filled one component tensor at a time."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from mergekit_ftt.delta.format import SHARD_PREFIX, FileInfo, file_sha256

GB = 1000**3


class ShardWriter:
    """Writes component tensors into safetensors shards of at most ``shard_bytes``
    (a tensor's components always share a shard) and hashes each finished file."""

    def __init__(self, folder: Path, shard_bytes: int):
        self.folder = folder
        self.shard_bytes = shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[str] = []
        self._owner: dict[str, int] = {}  # component name -> shard index
        self._hashes = ThreadPoolExecutor(max_workers=1)
        self._digests: list[Future] = []

    def reserve(self, nbytes: int) -> None:
        """Write out the shard being filled if ``nbytes`` more would overflow it."""
        if self._pending and self._pending_bytes + nbytes > self.shard_bytes:
            self._flush()

    def add(self, components: dict[str, torch.Tensor]) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in components.values())
        self.reserve(nbytes)
        for name, tensor in components.items():
            self._pending[name] = tensor.contiguous()
            self._owner[name] = len(self._written)
        self._pending_bytes += nbytes

    def finish(self) -> tuple[dict[str, str], dict[str, FileInfo]]:
        """Rename to ``delta-0000i-of-0000n.safetensors``; component -> file, file -> info."""
        self._flush()
        self._hashes.shutdown(wait=True)
        count = len(self._written)
        names = [
            f"{SHARD_PREFIX}.safetensors"
            if count == 1
            else f"{SHARD_PREFIX}-{index + 1:05d}-of-{count:05d}.safetensors"
            for index in range(count)
        ]
        files = {}
        for temporary, final, digest in zip(self._written, names, self._digests, strict=True):
            (self.folder / temporary).rename(self.folder / final)
            files[final] = FileInfo(
                size=(self.folder / final).stat().st_size, sha256=digest.result()
            )
        return {name: names[index] for name, index in self._owner.items()}, files

    def _flush(self) -> None:
        if not self._pending:
            return
        from safetensors.torch import save_file

        name = f"{SHARD_PREFIX}-part{len(self._written) + 1:05d}.safetensors"
        save_file(self._pending, self.folder / name, metadata={"format": "pt"})
        self._written.append(name)
        self._digests.append(self._hashes.submit(file_sha256, self.folder / name))
        self._pending, self._pending_bytes = {}, 0
