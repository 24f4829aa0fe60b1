"""The delta folder that ``ftt-delta extract`` writes and a ``role: delta`` input reads.

::

    DELTA/
      delta_config.json                 what this module describes: format version, sources,
                                        encoding, vocabulary, every tensor and every file
      config.json                       the fine-tuned model's config (mergekit reads the
                                        architecture from it, as for any model folder)
      delta-00001-of-00002.safetensors  the tensors, see below
      tokenizer*, chat template, generation_config.json   the fine-tuned model's
      README.md                         model card

Each model tensor ``NAME`` is stored as one or more components, all in the same file:

==========================  ========================================================
``NAME``                    Δ, dense, in the stored dtype (kind ``dense``; the 1-D
                            tensors of kind ``sign``)
``NAME.exact_index``        flat indices where the stored dtype rounds Δ (``exact``)
``NAME.exact_value``        Δ at those indices (float32)
``NAME.exact_index64``      the few indices where float32 too would round Δ
``NAME.exact_value64``      Δ at those (float64)
``NAME.mask``               kind ``sparse``: the kept elements, 8 per byte
``NAME.values``             kind ``sparse``: the kept values in flat order
``NAME.sign``               kind ``sign``: 1 bit per element, set where Δ > 0
``NAME.scale``              kind ``sign``: float32, one per row or one per matrix
``NAME.full_rows``          kinds ``sparse``/``sign``: vocabulary rows only the
                            fine-tuned model has, its own values (kind ``dense`` keeps
                            them in place in ``NAME``)
==========================  ========================================================

Bits are packed in flat (row-major) order, least significant bit first. "Exact" means
equal to the float64 difference ``float64(ft) − float64(base)`` that
``finetuning_transfer`` computes from the two models.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergekit_ftt.errors import DeltaError
from mergekit_ftt.modules import module_path

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "mergekit-ftt-delta"
FORMAT_VERSION = 1
CONFIG_FILE = "delta_config.json"
SHARD_PREFIX = "delta"

# Component suffixes (see the module docstring).
DENSE = ""
EXACT_INDEX = ".exact_index"
EXACT_VALUE = ".exact_value"
EXACT_INDEX64 = ".exact_index64"
EXACT_VALUE64 = ".exact_value64"
MASK = ".mask"
VALUES = ".values"
SIGN = ".sign"
SCALE = ".scale"
FULL_ROWS = ".full_rows"

# safetensors' dtype names, and the torch names used in delta_config.json.
SAFETENSORS_DTYPES = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "U8": "uint8",
    "I32": "int32",
    "I64": "int64",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceModel(_Strict):
    """One of the two models the delta was taken from."""

    model: str = Field(description="Hub id or local path, as given to ftt-delta extract")
    revision: str | None = Field(None, description="the revision asked for (model@revision)")
    commit: str | None = Field(None, description="Hub commit of the files read, when known")
    weights_sha256: str | None = Field(
        None, description="sha256 over every tensor's name, dtype, shape and bytes"
    )
    dtype: str = Field(description="dtype of its floating-point weights")


class Encoding(_Strict):
    """How Δ is stored."""

    kind: Literal["dense", "sparse", "sign"]
    dtype: str = Field(description="stored dtype of Δ's values (and of the decoded tensors)")
    exact: bool = Field(False, description="dense: corrections make the decoded Δ exact")
    method: Literal["magnitude", "random"] | None = Field(
        None, description="sparse: mergekit's sparsification method (random = DARE)"
    )
    density: float | None = Field(None, description="sparse: fraction of elements kept")
    rescale: bool | None = Field(None, description="sparse: L1 rescaling of the kept values")
    seed: int | None = Field(None, description="sparse random: torch seed")
    block_elements: int | None = Field(
        None, description="sparse: sparsify runs per block of whole rows of at most this size"
    )
    scale: Literal["row", "matrix"] | None = Field(None, description="sign: scale granularity")


class Component(_Strict):
    file: str
    dtype: str
    shape: list[int]


class TensorInfo(_Strict):
    """One model tensor of the delta."""

    shape: list[int] = Field(description="shape of Δ (the fine-tuned model's tensor)")
    components: dict[str, Component] = Field(description="suffix -> stored component")
    vocabulary_axis: int | None = None
    full_rows: list[int] = Field(
        default_factory=list, description="rows that hold the fine-tuned model's own values"
    )
    corrections: int = Field(0, description="elements stored exactly beside the rounded tensor")
    norm: float = Field(description="‖Δ‖₂ of the exact Δ, full rows excluded")
    error: float = Field(description="‖decoded − exact Δ‖₂, full rows excluded")

    @property
    def relative_error(self) -> float:
        return self.error / self.norm if self.norm else 0.0


class Vocabulary(_Strict):
    aligned_by: Literal["row", "token"] = Field(
        description="row: both models have the same rows; token: rows matched by token"
    )
    finetuned_rows: int | None = None
    base_rows: int | None = None
    added_tokens: list[str] = Field(
        default_factory=list, description="tokens only the fine-tuned model has (full rows)"
    )


class FileInfo(_Strict):
    size: int
    sha256: str


class DeltaConfig(_Strict):
    """``delta_config.json``."""

    format: Literal["mergekit-ftt-delta"] = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    created_by: str
    finetuned: SourceModel
    base: SourceModel
    model_type: str
    architectures: list[str]
    source_config: dict = Field(description="the fine-tuned model's config.json")
    encoding: Encoding
    vocabulary: Vocabulary
    tensors: dict[str, TensorInfo]
    files: dict[str, FileInfo]
    config_sha256: str | None = Field(
        None,
        description="sha256 of this file's other keys (config_digest): the files' hashes "
        "cover the weights, this one the description of them; None in deltas extracted "
        "before it was recorded",
    )

    def module_errors(self) -> list[tuple[str, int, float]]:
        """(module path, tensors, ‖decoded − Δ‖ / ‖Δ‖ over those tensors), in first-seen
        order; the module path is the tensor name with its layer index as ``*``."""
        sums: dict[str, list[float]] = {}
        for name, info in self.tensors.items():
            entry = sums.setdefault(module_path(name), [0, 0.0, 0.0])
            entry[0] += 1
            entry[1] += info.error**2
            entry[2] += info.norm**2
        return [
            (module, int(count), math.sqrt(error) / math.sqrt(norm) if norm else 0.0)
            for module, (count, error, norm) in sums.items()
        ]

    @property
    def stored_bytes(self) -> int:
        return sum(file.size for file in self.files.values())


def config_digest(raw: dict) -> str:
    """sha256 of ``delta_config.json``'s keys but ``config_sha256``, in a canonical form
    (sorted keys, no spaces), so that re-indenting the file changes nothing."""
    body = {key: value for key, value in raw.items() if key != "config_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def config_json(config: DeltaConfig) -> str:
    """The text of ``delta_config.json``, its ``config_sha256`` filled in."""
    raw = json.loads(config.model_dump_json())
    raw["config_sha256"] = config_digest(raw)
    return json.dumps(raw, indent=2, ensure_ascii=False) + "\n"


def is_delta_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_config(path: str | Path) -> DeltaConfig:
    """Parse ``delta_config.json``; an unknown format or version is refused first."""
    config_path = Path(path) / CONFIG_FILE
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DeltaError(
            f"{path} is not a delta folder: it has no {CONFIG_FILE}. Make one with "
            "`ftt-delta extract`."
        ) from None
    except json.JSONDecodeError as error:
        raise DeltaError(f"{config_path} is not valid JSON ({error}).") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise DeltaError(f"{config_path} does not describe a {FORMAT_NAME} folder.")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise DeltaError(
            f"{path} uses delta format version {version}; this mergekit-ftt reads version "
            f"{FORMAT_VERSION}. "
            + (
                "Upgrade mergekit-ftt (pip install -U mergekit-ftt)."
                if isinstance(version, int) and version > FORMAT_VERSION
                else "Extract the delta again with `ftt-delta extract`."
            )
        )
    recorded = raw.get("config_sha256")
    if recorded is not None and recorded != config_digest(raw):
        raise DeltaError(
            f"{config_path} was changed after extraction: its content no longer matches the "
            "config_sha256 recorded in it, so its description of the tensors cannot be "
            "trusted. Restore the file from the extracted copy, or extract the delta again."
        )
    try:
        return DeltaConfig.model_validate(raw)
    except ValidationError as error:
        raise DeltaError(f"{config_path} is malformed: {error}") from None


class DeltaFolder:
    """Reads a delta folder tensor by tensor (one safetensors file open at a time)."""

    def __init__(self, path: str | Path, config: DeltaConfig | None = None):
        self.path = Path(path)
        self.config = config or read_config(self.path)
        self._lock = threading.Lock()
        self._open_file: str | None = None
        self._handle = None

    # --- checks -------------------------------------------------------------------------

    def check_files(self, hashes: bool = True, remembered: bool = True) -> None:
        """Raise :class:`DeltaError` unless every file and component matches the config.

        Sizes and safetensors headers (every component's dtype and shape) are always
        checked; ``hashes`` also compares each file's sha256 (reads every byte once, in
        parallel over files). With ``remembered``, a file whose sha256 this machine has
        already checked is not read again while its path, size, mtime and inode are
        unchanged (:class:`VerifiedFiles`).
        """
        from safetensors import safe_open

        for name, info in self.config.files.items():
            file = self.path / name
            if not file.is_file():
                raise DeltaError(f"{self.path} lacks {name}, listed in its {CONFIG_FILE}.")
            if file.stat().st_size != info.size:
                raise DeltaError(
                    f"{file} has {file.stat().st_size} bytes but {CONFIG_FILE} records "
                    f"{info.size}: the file was changed or truncated. Extract the delta again "
                    "or copy the folder again."
                )
        headers: dict[str, dict[str, tuple[str, list[int]]]] = {}
        for name in self.config.files:
            with safe_open(self.path / name, framework="pt") as handle:
                headers[name] = {}
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    view = handle.get_slice(key)
                    dtype = SAFETENSORS_DTYPES.get(view.get_dtype(), view.get_dtype())
                    headers[name][key] = (dtype, list(view.get_shape()))
        for tensor_name, tensor in self.config.tensors.items():
            for suffix, component in tensor.components.items():
                stored = headers.get(component.file, {}).get(tensor_name + suffix)
                expected = (component.dtype, component.shape)
                if stored != expected:
                    found = "missing" if stored is None else f"{stored[0]} {stored[1]}"
                    raise DeltaError(
                        f"{self.path / component.file}: {tensor_name + suffix} is {found} but "
                        f"{CONFIG_FILE} records {expected[0]} {expected[1]}. The delta files do "
                        "not belong to this delta_config.json; extract the delta again."
                    )
        if hashes:
            self._check_hashes(remembered)

    def _check_hashes(self, remembered: bool) -> None:
        verified = VerifiedFiles.load() if remembered else VerifiedFiles({})
        names = [
            name
            for name, info in self.config.files.items()
            if not verified.holds(self.path / name, info.sha256)
        ]
        with ThreadPoolExecutor(max_workers=min(4, len(names) or 1)) as pool:
            digests = dict(
                zip(names, pool.map(lambda n: file_sha256(self.path / n), names), strict=True)
            )
        for name, digest in digests.items():
            if digest != self.config.files[name].sha256:
                raise DeltaError(
                    f"{self.path / name} does not match the sha256 recorded in {CONFIG_FILE}: "
                    "the file was modified or belongs to another delta. Extract the delta "
                    "again or copy the folder again."
                )
            verified.record(self.path / name, digest)
        if digests:
            verified.save()

    # --- reading ------------------------------------------------------------------------

    @property
    def tensor_names(self) -> list[str]:
        return list(self.config.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.config.tensors[name]

    def component(self, name: str, suffix: str) -> torch.Tensor:
        """One stored component of tensor ``name`` (memory-mapped where safetensors can)."""
        entry = self.config.tensors[name].components[suffix]
        with self._lock:
            handle = self._file(entry.file)
            return handle.get_tensor(name + suffix)

    def corrections(self, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Where :meth:`tensor` is rounded: ``(flat indices int64, exact values)`` lists
        (float32 values, then the float64 ones), each ascending, disjoint."""
        import torch

        components = self.config.tensors[name].components
        return [
            (self.component(name, index).to(torch.int64), self.component(name, value))
            for index, value in ((EXACT_INDEX, EXACT_VALUE), (EXACT_INDEX64, EXACT_VALUE64))
            if index in components
        ]

    def close(self) -> None:
        with self._lock:
            self._handle = None
            self._open_file = None

    def _file(self, file: str):
        from safetensors import safe_open

        if self._open_file != file:
            self._handle = safe_open(self.path / file, framework="pt")
            self._open_file = file
        return self._handle


class VerifiedFiles:
    """Files whose sha256 was checked on this machine, by real path, size, mtime and inode.

    Applying a delta checks every file's sha256 before the merge; this record spares
    reading an unchanged file again (16 GB at 8B). A file that was modified, replaced or
    copied elsewhere has another mtime, inode or path and is read again.
    """

    def __init__(self, entries: dict[str, dict]):
        self.entries = entries

    @staticmethod
    def location() -> Path:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(cache) / "mergekit-ftt" / "verified-delta-files.json"

    @classmethod
    def load(cls) -> VerifiedFiles:
        try:
            return cls(json.loads(cls.location().read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return cls({})

    @staticmethod
    def _stamp(path: Path) -> tuple[str, dict]:
        real = os.path.realpath(path)
        status = os.stat(real)
        return real, {
            "size": status.st_size,
            "mtime_ns": status.st_mtime_ns,
            "inode": status.st_ino,
        }

    def holds(self, path: Path, sha256: str) -> bool:
        real, stamp = self._stamp(path)
        return self.entries.get(real) == {**stamp, "sha256": sha256}

    def record(self, path: Path, sha256: str) -> None:
        real, stamp = self._stamp(path)
        self.entries[real] = {**stamp, "sha256": sha256}

    def save(self) -> None:
        """Best effort: a read-only home only means hashing again next time."""
        location = self.location()
        try:
            location.parent.mkdir(parents=True, exist_ok=True)
            partial = location.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps(self.entries, indent=1), encoding="utf-8")
            os.replace(partial, location)
        except OSError:
            pass


def file_sha256(path: Path, block: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()
