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

import math
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
    Component,
    DeltaConfig,
    Encoding,
    FileInfo,
    TensorInfo,
    VerifiedFiles,
    config_json,
    is_delta_folder,
    read_config,
)
from mergekit_ftt.delta.options import ExtractOptions
from mergekit_ftt.delta.plan import Plan, plan_extraction
from mergekit_ftt.delta.shards import ShardWriter
from mergekit_ftt.delta.source import TOKENIZER_FILES, Source, require_sources, tensor_digest
from mergekit_ftt.errors import DeltaError
from mergekit_ftt.outputs import StagedOutput


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
    require_sources(finetuned, base)
    progress(f"reading configs, tensor indexes and headers of {finetuned} and {base}")
    ft_model, base_model = Source.open(finetuned), Source.open(base)
    plan = plan_extraction(ft_model, base_model)
    source_dtype = _float_dtype(ft_model, plan)
    encoding = encoding_for(options, source_dtype)
    if is_delta_folder(out) and not options.overwrite:
        finished = _finished_extraction(out, ft_model, base_model, encoding)
        progress(f"{out} is complete: it holds this delta; nothing to do (--overwrite redoes it)")
        return finished
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
        if not overwrite and not is_delta_folder(out):  # a delta: _finished_extraction
            raise DeltaError(f"{out} is not empty; choose a new folder or pass --overwrite.")
        if not is_delta_folder(out):
            raise DeltaError(
                f"{out} is not empty and holds no delta; --overwrite only replaces a delta "
                "folder. Choose a new folder."
            )


def _finished_extraction(
    out: Path, finetuned: Source, base: Source, encoding: Encoding
) -> DeltaConfig:
    """The config of the delta folder ``out`` if an earlier run of this extraction wrote
    it (same models, same encoding; a folder appears only once complete), else refuse."""
    existing = read_config(out)
    same = (
        (existing.finetuned.model, existing.finetuned.revision)
        == (finetuned.describe("", False).model, finetuned.reference.model.revision)
        and (existing.base.model, existing.base.revision)
        == (base.describe("", False).model, base.reference.model.revision)
        and existing.encoding == encoding
    )
    if not same:
        raise DeltaError(
            f"{out} holds another delta ({existing.finetuned.model} − {existing.base.model}, "
            f"{existing.encoding.kind}); choose a new folder or pass --overwrite."
        )
    return existing


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
    # A Stages (the command) draws its bar on the terminal, past the library log.
    bar = (
        progress.progress(len(order), "tensors", unit="tensor")
        if hasattr(progress, "progress")
        else tqdm(total=len(order), desc="tensors", unit="tensor", leave=False)
    )
    for name in order:
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
        bar.update()
    bar.close()
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
    (folder / CONFIG_FILE).write_text(config_json(config), encoding="utf-8")
