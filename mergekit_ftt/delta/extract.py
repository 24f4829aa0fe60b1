"""``ftt-delta extract``: Δ = finetuned − base, streamed tensor by tensor into a delta folder.

Each tensor is read from both models through mergekit's own lazy loaders (safetensors is
memory-mapped), differenced in float64 in blocks of whole rows exactly as
``finetuning_transfer`` computes it, encoded (:mod:`mergekit_ftt.delta.encode`) and
queued for a shard of at most ``shard_size`` bytes. Memory is one tensor's encoded output,
one shard being filled and one float64 block, whatever the model size.

Everything is written into ``.OUT.incomplete`` and renamed to ``OUT`` at the end, so an
interrupted extraction never leaves a folder that looks complete.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_ftt import __version__
from mergekit_ftt.delta.encode import (
    BLOCK_ELEMENTS,
    SPARSIFY_BLOCK_ELEMENTS,
    encoder_for,
    rows_per_block,
)
from mergekit_ftt.delta.format import (
    CONFIG_FILE,
    FULL_ROWS,
    SHARD_PREFIX,
    Component,
    DeltaConfig,
    Encoding,
    FileInfo,
    SourceModel,
    TensorInfo,
    VerifiedFiles,
    Vocabulary,
    file_sha256,
    is_delta_folder,
)
from mergekit_ftt.delta.options import ExtractOptions
from mergekit_ftt.errors import DeltaError
from mergekit_ftt.outputs import StagedOutput

GB = 1000**3
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


def encoding_for(options: ExtractOptions, source_dtype: str) -> Encoding:
    """How the delta folder stores Δ, from the options and the fine-tuned model's dtype."""
    dtype = options.dtype or source_dtype
    if options.compress == "none":
        return Encoding(kind="dense", dtype=dtype, exact=options.exact)
    if options.compress == "sign":
        return Encoding(kind="sign", dtype=dtype, scale=options.scale)
    random = options.compress == "dare"
    return Encoding(
        kind="sparse",
        dtype=dtype,
        method="random" if random else "magnitude",
        density=options.density,
        rescale=random if options.rescale is None else options.rescale,
        seed=options.seed if random else None,
        block_elements=SPARSIFY_BLOCK_ELEMENTS,
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


def tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """sha256 of a tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(f"{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
    digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


@dataclass(frozen=True)
class Plan:
    """Which tensor of each model makes each delta tensor, and how rows line up."""

    tensors: dict[str, tuple[str, str]]  # delta name -> (finetuned name, base name)
    vocabulary_axis: dict[str, int | None]
    row_map: torch.Tensor | None  # finetuned row -> base row, −1: a token only it has
    vocabulary: Vocabulary


def plan_extraction(finetuned: Source, base: Source) -> Plan:
    """Check that ``base`` is the model ``finetuned`` was trained from; map tensors and rows.

    Reads configs, tensor indexes and safetensors headers only.
    """
    ft_arch = (finetuned.config.model_type, list(finetuned.config.architectures or []))
    base_arch = (base.config.model_type, list(base.config.architectures or []))
    if ft_arch != base_arch:
        raise DeltaError(
            f"fine-tuned model {finetuned.given} is {ft_arch[0]} {ft_arch[1]} but base "
            f"{base.given} is {base_arch[0]} {base_arch[1]}; a delta is taken between a "
            "fine-tuned model and the base it was trained from."
        )
    weights = _weight_names(finetuned)
    tensors, axes = {}, {}
    for name, (alternatives, axis, optional) in weights.items():
        ft_name = next((n for n in alternatives if n in finetuned.names), None)
        base_name = next((n for n in alternatives if n in base.names), None)
        if ft_name is None and optional:
            continue
        if ft_name is None or base_name is None:
            model = finetuned if ft_name is None else base
            raise DeltaError(
                f"{model.given} lacks tensor {name}. Both models must be complete "
                "checkpoints of the same architecture."
            )
        if ft_name != name and base_name != name:
            continue  # tied in both models: the tensor it is tied to carries its delta
        tensors[name], axes[name] = (ft_name, base_name), axis
    ft_vocab = finetuned.config.get_text_config().vocab_size
    base_vocab = base.config.get_text_config().vocab_size
    row_counts = set()
    for name, (ft_name, base_name) in tensors.items():
        ft_shape, base_shape = finetuned.shape(ft_name), base.shape(base_name)
        if ft_shape is None or base_shape is None or ft_shape == base_shape:
            continue
        differing = [a for a in range(len(ft_shape)) if ft_shape[a] != base_shape[a]]
        is_vocabulary = (
            len(ft_shape) == len(base_shape)
            and differing == [0]
            and axes[name] in (0, None)
            and {ft_shape[0], base_shape[0]} <= {ft_vocab, base_vocab}
        )
        if not is_vocabulary:
            raise DeltaError(
                f"{name} has shape {list(ft_shape)} in {finetuned.given} but "
                f"{list(base_shape)} in {base.given}: these are not a fine-tuned model and "
                "its base (only vocabulary rows may differ)."
            )
        axes[name] = 0
        row_counts.add((ft_shape[0], base_shape[0]))
    if not row_counts:
        return Plan(tensors, axes, None, Vocabulary(aligned_by="row"))
    (ft_rows, base_rows), *others = sorted(row_counts)
    if others:
        raise DeltaError(f"vocabulary tensors disagree on their row counts: {row_counts}")
    row_map, added = _align_rows(finetuned, base, ft_rows, base_rows)
    vocabulary = Vocabulary(
        aligned_by="token", finetuned_rows=ft_rows, base_rows=base_rows, added_tokens=added
    )
    return Plan(tensors, axes, row_map, vocabulary)


def _weight_names(model: Source) -> dict[str, tuple[list[str], int | None, bool]]:
    """name -> (names to look for, vocabulary axis, optional), from mergekit's architecture
    definitions when it has one (the tensors mergekit will load), else the checkpoint."""
    from mergekit.architecture import arch_info_for_config

    try:
        architecture = arch_info_for_config(model.config)
    except RuntimeError:
        architecture = None
    if architecture is None:
        return {name: ([name], None, False) for name in sorted(model.names)}
    return {
        w.name: ([w.name, *(w.aliases or ()), *(w.tied_names or ())], w.vocabulary_axis, w.optional)
        for w in architecture.all_weights(model.config)
    }


def _align_rows(
    finetuned: Source, base: Source, ft_rows: int, base_rows: int
) -> tuple[torch.Tensor, list[str]]:
    """Match the fine-tuned model's vocabulary rows to the base's by token, as mergekit
    does with ``tokenizer: {source: <fine-tuned>}``; rows of tokens the base lacks are −1."""
    from transformers import AutoTokenizer

    vocabularies = []
    for model in (finetuned, base):
        try:
            tokenizer = AutoTokenizer.from_pretrained(model.path)
        except (OSError, ValueError) as error:
            raise DeltaError(
                f"{model.given} has {ft_rows if model is finetuned else base_rows} vocabulary "
                f"rows and the other model {base_rows if model is finetuned else ft_rows}; "
                f"rows are matched by token, but its tokenizer cannot be loaded ({error})."
            ) from None
        vocabularies.append(tokenizer.get_vocab())
    ft_vocab, base_vocab = vocabularies
    row_map = torch.full((ft_rows,), -1, dtype=torch.int64)
    ft_token_rows = {index for index in ft_vocab.values() if index < ft_rows}
    base_token_rows = {index for index in base_vocab.values() if index < base_rows}
    added = []
    for token, index in sorted(ft_vocab.items(), key=lambda item: item[1]):
        if index >= ft_rows:
            continue
        base_index = base_vocab.get(token)
        if base_index is not None and base_index < base_rows:
            row_map[index] = base_index
        else:
            added.append(token)
    for index in range(min(ft_rows, base_rows)):  # rows without a token (padding)
        if index not in ft_token_rows and index not in base_token_rows:
            row_map[index] = index
    return row_map, added


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


def extract(
    finetuned: str,
    base: str,
    out: str | Path,
    options: ExtractOptions,
    progress: Callable[[str], None] = print,
) -> DeltaConfig:
    """Write the delta ``finetuned − base`` to the folder ``out``; return its config."""
    out = Path(out)
    _check_output(out, options.overwrite)
    progress(f"reading configs, tensor indexes and headers of {finetuned} and {base}")
    ft_model, base_model = Source.open(finetuned), Source.open(base)
    plan = plan_extraction(ft_model, base_model)
    source_dtype = _float_dtype(ft_model, plan)
    encoding = encoding_for(options, source_dtype)
    with StagedOutput(out, replace=options.overwrite) as staging:
        staging.mkdir()
        tensors, files = _extract_tensors(
            ft_model, base_model, plan, encoding, staging, options, progress
        )
        config = DeltaConfig(
            created_by=f"mergekit-ftt {__version__}",
            finetuned=ft_model.describe(source_dtype, options.source_hash),
            base=base_model.describe(_float_dtype(base_model, plan, 1), options.source_hash),
            model_type=ft_model.config.model_type,
            architectures=list(ft_model.config.architectures or []),
            source_config=ft_model.config.to_dict(),
            encoding=encoding,
            vocabulary=plan.vocabulary,
            tensors=tensors,
            files=files,
        )
        _write_side_files(ft_model, config, staging, out.name)
    _remember_verified(out, config.files)
    return config


def _remember_verified(folder: Path, files: dict[str, FileInfo]) -> None:
    """The files were hashed as they were written: applying the delta on this machine need
    not read them again (recorded after the rename, which changes their path)."""
    verified = VerifiedFiles.load()
    for name, info in files.items():
        verified.record(folder / name, info.sha256)
    verified.save()


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DeltaError(f"{out} is a file; give a folder for the delta.")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DeltaError(f"{out} is not empty; choose a new folder or pass --overwrite.")
        if not is_delta_folder(out):
            raise DeltaError(
                f"{out} is not empty and holds no delta; --overwrite only replaces a delta "
                "folder. Choose a new folder."
            )


def _float_dtype(model: Source, plan: Plan, which: int = 0) -> str:
    """The dtype of the model's first floating-point tensor in the plan."""
    from safetensors import safe_open

    for pair in plan.tensors.values():
        name = pair[which]
        shard = model.loader.index.tensor_paths[name]
        if shard.endswith(".safetensors"):
            with safe_open(model.path / shard, framework="pt") as handle:
                dtype = handle.get_slice(name).get_dtype()
        else:
            dtype = {torch.bfloat16: "BF16", torch.float16: "F16"}.get(
                model.tensor(name).dtype, "F32"
            )
        if dtype in ("BF16", "F16", "F32", "F64"):
            return {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}[dtype]
    return "float32"


def _extract_tensors(
    ft_model: Source,
    base_model: Source,
    plan: Plan,
    encoding: Encoding,
    folder: Path,
    options: ExtractOptions,
    progress: Callable[[str], None],
) -> tuple[dict[str, TensorInfo], dict[str, FileInfo]]:
    from tqdm import tqdm

    writer = ShardWriter(folder, int(options.shard_size))
    hasher = ThreadPoolExecutor(max_workers=1) if options.source_hash else None
    if encoding.kind == "sparse" and encoding.method == "random":
        torch.manual_seed(encoding.seed)
    order = sorted(
        plan.tensors, key=lambda n: (ft_model.loader.index.tensor_paths[plan.tensors[n][0]], n)
    )
    infos: dict[str, TensorInfo] = {}
    progress(f"extracting {len(order)} tensors ({encoding.kind}, {encoding.dtype})")
    for name in tqdm(order, desc="tensors", unit="tensor", leave=False):
        ft_name, base_name = plan.tensors[name]
        finetuned, base = ft_model.tensor(ft_name), base_model.tensor(base_name)
        if hasher is not None:
            ft_model.digests[ft_name] = hasher.submit(tensor_digest, ft_name, finetuned)
            base_model.digests[base_name] = hasher.submit(tensor_digest, base_name, base)
        row_map = (
            plan.row_map if plan.vocabulary_axis[name] == 0 and plan.row_map is not None else None
        )
        if row_map is None and finetuned.shape != base.shape:
            raise DeltaError(f"{name}: shape {list(finetuned.shape)} vs {list(base.shape)}")
        estimate = (
            finetuned.numel() * torch.empty((), dtype=getattr(torch, encoding.dtype)).element_size()
        )
        writer.reserve(estimate)
        infos[name], components = _encode_tensor(finetuned, base, row_map, encoding)
        writer.add({name + suffix: tensor for suffix, tensor in components.items()})
        if hasher is not None:  # hold no more than one tensor's pages for the hasher
            ft_model.digests[ft_name].result()
            base_model.digests[base_name].result()
        del finetuned, base, components
    if hasher is not None:
        hasher.shutdown(wait=True)
    progress("writing the last shard and hashing the files")
    owners, files = writer.finish()
    infos = {name: infos[name] for name in plan.tensors}  # the model's order, not the files'
    for name, info in infos.items():
        for suffix, component in info.components.items():
            component.file = owners[name + suffix]
    return infos, files


def _encode_tensor(
    finetuned: torch.Tensor,
    base: torch.Tensor,
    row_map: torch.Tensor | None,
    encoding: Encoding,
) -> tuple[TensorInfo, dict[str, torch.Tensor]]:
    shape = tuple(finetuned.shape)
    encoder = encoder_for(shape, encoding)
    rows, row_elements = encoder.rows, encoder.row_elements
    ft_rows = finetuned.reshape(rows, row_elements)
    base_rows = base.reshape(-1, row_elements)
    full_rows = [] if row_map is None else row_map.lt(0).nonzero().squeeze(1).tolist()
    compressed = encoding.kind != "dense"
    squared_norm = 0.0
    step = rows_per_block(row_elements, encoding.block_elements or BLOCK_ELEMENTS)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = ft_rows[start:stop].to(torch.float64)
        if row_map is None:
            block.sub_(base_rows[start:stop])
            kept = torch.ones(stop - start, dtype=torch.bool)
        else:
            mapped = row_map[start:stop]
            kept = mapped.ge(0)
            block[kept] -= base_rows.index_select(0, mapped[kept]).to(torch.float64)
            if compressed:
                block[~kept] = 0
        squared_norm += float(block[kept].square().sum())
        encoder.add(start, block, kept)
    encoded = encoder.finish()
    components = dict(encoded.components)
    if compressed and full_rows:
        components[FULL_ROWS] = ft_rows[full_rows].clone()
    info = TensorInfo(
        shape=list(shape),
        components={
            suffix: Component(
                file="", dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape)
            )
            for suffix, t in components.items()
        },
        vocabulary_axis=0 if row_map is not None else None,
        full_rows=full_rows,
        corrections=encoded.corrections,
        norm=math.sqrt(squared_norm),
        error=encoded.error,
    )
    return info, components


def _write_side_files(finetuned: Source, config: DeltaConfig, folder: Path, name: str) -> None:
    """config.json, the fine-tuned model's tokenizer and generation config, the card and
    delta_config.json (last: its presence marks a finished folder)."""
    from mergekit_ftt.card import delta_card

    shutil.copy(finetuned.path / "config.json", folder / "config.json")
    tokenizer_folder = finetuned.tokenizer_folder()
    for name in TOKENIZER_FILES:
        if (tokenizer_folder / name).is_file():
            shutil.copy(tokenizer_folder / name, folder / name)
    (folder / "README.md").write_text(delta_card(config, name), encoding="utf-8")
    (folder / CONFIG_FILE).write_text(config.model_dump_json(indent=2) + "\n", encoding="utf-8")
