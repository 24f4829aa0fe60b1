"""Read a merge's input tensors into the page cache ahead of the merge, in its order.

mergekit maps the input shards (safetensors ``safe_open``), so a tensor's bytes are read
from disk only when the merge kernel first touches them: each read stalls the
arithmetic, and the disk idles while the kernel computes and mergekit writes. During a
``finetuning_transfer`` merge a background thread asks the operating system
(``posix_fadvise(POSIX_FADV_WILLNEED)``) for the bytes of the next tensors of every
input, in the order mergekit merges them, at most ``window_bytes`` ahead of the tensor
being merged; the kernel reports each tensor it starts (:func:`reached`). Nothing is
copied: the pages land in the page cache, where the kernel's first touch finds them.

mergekit's executor orders its tasks by tensor name (``group_label``) and finishes one
tensor before loading the next, so the merge order is the sorted list of names. Best
effort throughout: inputs that are not local safetensors folders, recipes with
``slices``/``modules`` (whose input names differ from the output's) and systems without
``posix_fadvise`` are merged exactly as before, only without reading ahead.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mergekit.config import MergeConfiguration
from mergekit.io.lazy_tensor_loader import ShardedTensorIndex

from mergekit_ftt import METHOD_NAME

LOG = logging.getLogger(__name__)

# How far ahead of the tensor being merged to read, in input bytes. Enough to keep the
# disk busy through a few tensors of computing and through an output shard being
# written; small next to the page cache of any machine that merges 8B models. The
# environment variable overrides it (0 turns reading ahead off).
WINDOW_BYTES = 1 << 30
WINDOW_VARIABLE = "MERGEKIT_FTT_READAHEAD_BYTES"
# One WILLNEED call reads at most the device's readahead size (read_ahead_kb), so larger
# ranges are requested in steps of that size: 128 KiB, Linux's default, where it cannot
# be read, and at most 8 MiB.
STEP_BYTES = 128 << 10
MAX_STEP_BYTES = 8 << 20


@dataclass(frozen=True)
class Extent:
    """The bytes of one tensor in one shard file."""

    path: str
    start: int
    end: int


Plan = list[tuple[str, list[Extent]]]  # (tensor name, its extents in every input), in order


def tensor_extents(folder: str | os.PathLike) -> dict[str, Extent]:
    """Byte range of every tensor of a safetensors checkpoint, from its shard headers."""
    index = ShardedTensorIndex.from_disk(str(folder))
    if not index.is_safetensors:
        return {}
    extents = {}
    for shard in index.shards:
        path = os.path.join(index.base_path, shard.filename)
        with open(path, "rb") as file:
            (header_length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(header_length))
        data_start = 8 + header_length
        for name in shard.contained_keys:
            begin, end = header[name]["data_offsets"]
            extents[name] = Extent(path, data_start + begin, data_start + end)
    return extents


def merge_plan(folders: list[str | os.PathLike]) -> Plan:
    """Every tensor name of the inputs in mergekit's merge order, with its extents."""
    per_input = [tensor_extents(folder) for folder in folders]
    names = sorted(set().union(*per_input))
    return [(name, [extents[name] for extents in per_input if name in extents]) for name in names]


def request_step(path: str | os.PathLike) -> int:
    """Bytes one WILLNEED call reads from the block device that holds ``path``."""
    try:
        device = os.stat(path).st_dev
        block = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
        for queue in (block / "queue", block.resolve().parent / "queue"):  # partition: disk's
            if (queue / "read_ahead_kb").exists():
                kib = int((queue / "read_ahead_kb").read_text())
                return min(max(kib << 10, STEP_BYTES), MAX_STEP_BYTES)
    except (OSError, ValueError):
        pass
    return STEP_BYTES


Advise = Callable[[int, int, int], None]  # (file descriptor, offset, length)


def _will_need(fd: int, offset: int, length: int) -> None:
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)


class Readahead:
    """A thread that requests the tensors of ``plan`` from disk ahead of :meth:`reached`."""

    def __init__(
        self,
        plan: Callable[[], Plan],
        window_bytes: int = WINDOW_BYTES,
        advise: Advise = _will_need,
        step_bytes: int | None = None,
    ):
        self._make_plan = plan
        self._window = window_bytes
        self._advise = advise
        self._step = step_bytes  # None: the readahead size of the inputs' disk
        self._positions: dict[str, int] = {}
        self._current = 0
        self._closed = False
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="ftt-readahead", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def reached(self, name: str) -> None:
        """The merge starts tensor ``name``: read on up to the window past it."""
        with self._condition:
            position = self._positions.get(name)
            if position is not None:
                self._current = position
                self._condition.notify()

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join()

    def _run(self) -> None:
        files: dict[str, int] = {}
        try:
            plan = self._make_plan()
            offsets = [0]  # input bytes before each tensor
            for _, extents in plan:
                offsets.append(offsets[-1] + sum(e.end - e.start for e in extents))
            with self._condition:
                self._positions = {name: index for index, (name, _) in enumerate(plan)}
            position = 0
            while position < len(plan):
                with self._condition:
                    while not self._closed and (
                        position > self._current
                        and offsets[position] - offsets[self._current] >= self._window
                    ):
                        self._condition.wait()
                    if self._closed:
                        return
                    position = max(position, self._current)
                self._request(plan[position][1], files)
                position += 1
        except Exception as error:  # reading ahead only ever speeds a merge up
            LOG.debug("readahead stopped: %r", error)
        finally:
            for fd in files.values():
                os.close(fd)

    def _request(self, extents: list[Extent], files: dict[str, int]) -> None:
        """Request one tensor of every input, the inputs in step, as the kernel reads them."""
        longest = max(extent.end - extent.start for extent in extents)
        step = self._step or request_step(extents[0].path)
        self._step = step
        for offset in range(0, longest, step):
            if self._closed:
                return
            for extent in extents:
                start = extent.start + offset
                if start < extent.end:
                    if extent.path not in files:
                        files[extent.path] = os.open(extent.path, os.O_RDONLY)
                    self._advise(files[extent.path], start, min(step, extent.end - start))


_active: Readahead | None = None


def reached(name: str | None) -> None:
    """Tell the running merge's readahead, if any, that tensor ``name`` is being merged."""
    readahead = _active
    if readahead is not None and name is not None:
        readahead.reached(name)


def local_input_folders(config: MergeConfiguration) -> list[str]:
    """The local folders of a ``models:`` recipe's inputs; none if any input is elsewhere."""
    if config.slices or config.modules or not config.models:
        return []
    models = [config.base_model, *(model_in.model for model_in in config.models)]
    if any(model is None or model.lora for model in models):
        return []
    folders = [model.model.path for model in models]
    return folders if all(os.path.isdir(folder) for folder in folders) else []


@contextmanager
def reading_ahead(config: MergeConfiguration) -> Iterator[None]:
    """Read ahead of a ``finetuning_transfer`` merge of local inputs while the block runs."""
    global _active
    window = int(os.environ.get(WINDOW_VARIABLE, WINDOW_BYTES))
    folders = local_input_folders(config) if config.merge_method == METHOD_NAME else []
    if not folders or window <= 0 or not hasattr(os, "posix_fadvise") or _active is not None:
        yield
        return
    readahead = Readahead(lambda: merge_plan([Path(folder) for folder in folders]), window)
    readahead.start()
    _active = readahead
    try:
        yield
    finally:
        _active = None
        readahead.close()
