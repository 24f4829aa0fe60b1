"""How Δ is stored, and read back: ``dense`` (exact or rounded), ``sparse``, ``sign``.

An encoder takes the exact Δ of one tensor in blocks of whole rows (float64, as
``finetuning_transfer`` computes ``ft − base``) and returns the components to store
(:mod:`mergekit_ftt.delta.format` lists them) with the reconstruction error it causes.
:func:`decode` turns the components back into a dense tensor (one compiled pass; torch
blocks without numba).

- ``dense``: Δ rounded to the stored dtype. ``exact`` adds the elements the rounding
  changed, with their exact values (float32, or float64 where float32 also rounds), so
  a transfer from the delta is bit-identical to one from the two models.
- ``sparse``: mergekit's own :func:`mergekit.sparsify.sparsify` (``magnitude``, or
  ``random`` = DARE) on each block of at most ``block_elements``, then a bit mask and the
  kept values in the stored dtype.
- ``sign``: 1 bit per element (BitDelta without scale distillation) and a float32 scale
  per row or per matrix, the mean |Δ| (the least-squares scale for a sign matrix). 1-D
  tensors (norms, biases) are stored dense, rounded.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from mergekit_ftt.delta.format import (
    DENSE,
    EXACT_INDEX,
    EXACT_INDEX64,
    EXACT_VALUE,
    EXACT_VALUE64,
    FULL_ROWS,
    MASK,
    SCALE,
    SIGN,
    VALUES,
    DeltaFolder,
    Encoding,
)
from mergekit_ftt.errors import DeltaError

# Rows per work block: whole rows, at most this many elements (at least 8 rows). Bounds the
# float64 scratch of a block (Δ, its decoded copy, masks) to ~100 MiB whatever the tensor
# (an 8B embedding has 525M elements).
BLOCK_ELEMENTS = 1 << 22
# mergekit's sparsify runs on blocks of at most this many elements (recorded in the
# encoding, as it decides which elements are kept): every tensor of a 1B model in one
# block, an 8B embedding in 32.
SPARSIFY_BLOCK_ELEMENTS = 1 << 24

_BIT_WEIGHTS = torch.tensor([1 << bit for bit in range(8)], dtype=torch.uint8)


def rows_per_block(row_elements: int, block_elements: int = BLOCK_ELEMENTS) -> int:
    """Whole rows per block; a multiple of 8 rows so that packed bits split at byte edges."""
    rows = max(1, block_elements // max(row_elements, 1))
    return max(8, rows - rows % 8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Bool tensor (flat) -> uint8, 8 per byte, least significant bit first."""
    flat = bits.reshape(-1).to(torch.uint8)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """uint8 -> bool tensor of ``count`` elements (inverse of :func:`pack_bits`)."""
    bits = packed.reshape(-1, 1).bitwise_and(_BIT_WEIGHTS).ne(0)
    return bits.reshape(-1)[:count]


@dataclass
class Encoded:
    """What an encoder returns for one tensor."""

    components: dict[str, torch.Tensor]
    corrections: int
    error: float  # ‖decoded − Δ‖₂ over the rows that are not full rows


@dataclass
class Encoder(ABC):
    """Encodes one tensor, given block by block as float64 rows ``[rows, row_elements]``.

    ``kept`` marks the rows that are Δ (False: a full row, zeroed by the caller for the
    compressed kinds and excluded from the error).
    """

    shape: tuple[int, ...]
    encoding: Encoding
    squared_error: float = field(default=0.0, init=False)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.encoding.dtype)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_elements(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    @abstractmethod
    def add(self, start_row: int, block: torch.Tensor, kept: torch.Tensor) -> None: ...

    @abstractmethod
    def finish(self) -> Encoded: ...

    def _add_error(self, decoded: torch.Tensor, block: torch.Tensor, kept: torch.Tensor) -> None:
        diff = decoded.sub_(block)
        diff[~kept] = 0
        self.squared_error += float(diff.square_().sum())


class DenseEncoder(Encoder):
    def __init__(self, shape: tuple[int, ...], encoding: Encoding):
        super().__init__(shape, encoding)
        self.out = torch.empty(shape, dtype=self.dtype)
        self._flat = self.out.view(self.rows, self.row_elements)
        self._index_dtype = torch.int32 if math.prod(shape) < 2**31 else torch.int64
        # Exact values, kept compact as they come: (index, float32 value) for most,
        # (index, float64 value) where float32 rounds too.
        self._corrections: dict[str, list[torch.Tensor]] = {
            key: [] for key in (EXACT_INDEX, EXACT_VALUE, EXACT_INDEX64, EXACT_VALUE64)
        }

    def add(self, start_row: int, block: torch.Tensor, kept: torch.Tensor) -> None:
        rounded = self._flat[start_row : start_row + block.shape[0]]
        rounded.copy_(block)
        decoded = rounded.to(torch.float64)
        if self.encoding.exact:
            wrong = decoded.ne(block) & ~(decoded.isnan() & block.isnan())
            where = wrong.reshape(-1).nonzero().squeeze(1)
            if where.numel():
                values = block.reshape(-1)[where]
                decoded.view(-1)[where] = values
                self._keep(where + start_row * self.row_elements, values)
        self._add_error(decoded, block, kept)

    def _keep(self, index: torch.Tensor, values: torch.Tensor) -> None:
        as_float32 = values.to(torch.float32)
        fits = as_float32.to(torch.float64).eq(values).logical_or_(values.isnan())
        index = index.to(self._index_dtype)
        self._corrections[EXACT_INDEX].append(index[fits])
        self._corrections[EXACT_VALUE].append(as_float32[fits])
        if not fits.all():  # float32 rounds these too: rare (exponents > 16 apart)
            self._corrections[EXACT_INDEX64].append(index[~fits])
            self._corrections[EXACT_VALUE64].append(values[~fits])

    def finish(self) -> Encoded:
        components = {DENSE: self.out}
        for key, parts in self._corrections.items():
            if sum(part.numel() for part in parts):
                components[key] = torch.cat(parts)
            parts.clear()
        count = sum(components[k].numel() for k in (EXACT_INDEX, EXACT_INDEX64) if k in components)
        return Encoded(components, count, math.sqrt(self.squared_error))


class SparseEncoder(Encoder):
    def __init__(self, shape: tuple[int, ...], encoding: Encoding):
        super().__init__(shape, encoding)
        self._masks: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []

    def add(self, start_row: int, block: torch.Tensor, kept: torch.Tensor) -> None:
        from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify

        sparse = sparsify(
            block.to(torch.float32),
            density=self.encoding.density,
            method=SparsificationMethod(self.encoding.method),
            rescale_norm=RescaleNorm.l1 if self.encoding.rescale else None,
        )
        mask = sparse.ne(0)
        values = sparse[mask].to(self.dtype)
        self._masks.append(pack_bits(mask))
        self._values.append(values)
        decoded = torch.zeros_like(block)
        decoded[mask] = values.to(torch.float64)
        self._add_error(decoded, block, kept)

    def finish(self) -> Encoded:
        components = {MASK: torch.cat(self._masks), VALUES: torch.cat(self._values)}
        return Encoded(components, 0, math.sqrt(self.squared_error))


class SignEncoder(Encoder):
    """Signs now, scales at the end: a per-matrix scale needs the whole tensor's mean |Δ|."""

    def __init__(self, shape: tuple[int, ...], encoding: Encoding):
        super().__init__(shape, encoding)
        self._signs: list[torch.Tensor] = []
        self._row_scales: list[torch.Tensor] = []
        self._row_errors: list[torch.Tensor] = []
        self._sum_abs = 0.0
        self._sum_squares = 0.0
        self._count = 0

    def add(self, start_row: int, block: torch.Tensor, kept: torch.Tensor) -> None:
        self._signs.append(pack_bits(block.gt(0)))
        magnitude = block.abs() * kept.unsqueeze(1)
        if self.encoding.scale == "row":
            scale = magnitude.mean(dim=1)
            stored = scale.to(torch.float32).to(self.dtype).to(torch.float64)
            # Σ(|Δ| − s)² per row: a sign times a scale errs by ||Δ| − s| everywhere.
            error = magnitude.sub_(stored.unsqueeze(1)).square_().sum(dim=1)
            self._row_scales.append(scale.to(torch.float32))
            self._row_errors.append(error * kept)
        else:
            self._sum_abs += float(magnitude.sum())
            self._sum_squares += float(magnitude.square_().sum())
            self._count += int(kept.sum()) * block.shape[1]

    def finish(self) -> Encoded:
        if self.encoding.scale == "row":
            scale = torch.cat(self._row_scales)
            squared_error = float(torch.cat(self._row_errors).sum())
        else:
            mean = self._sum_abs / self._count if self._count else 0.0
            scale = torch.tensor([mean], dtype=torch.float32)
            s = float(scale.to(self.dtype))
            squared_error = self._sum_squares - 2 * s * self._sum_abs + self._count * s * s
        components = {SIGN: torch.cat(self._signs), SCALE: scale}
        return Encoded(components, 0, math.sqrt(max(squared_error, 0.0)))


def encoder_for(shape: tuple[int, ...], encoding: Encoding) -> Encoder:
    if encoding.kind == "sparse":
        return SparseEncoder(shape, encoding)
    if encoding.kind == "sign" and len(shape) >= 2:
        return SignEncoder(shape, encoding)
    if encoding.kind == "sign":  # 1-D: norms and biases stay dense
        return DenseEncoder(shape, encoding.model_copy(update={"exact": False}))
    return DenseEncoder(shape, encoding)


def decode(folder: DeltaFolder, name: str, jit: bool = True) -> torch.Tensor:
    """Δ of ``name`` as stored (dense: the memory-mapped tensor itself), full rows in place;
    exact corrections are left to the caller (:meth:`DeltaFolder.corrections`).

    The sign and sparse forms are unpacked in one compiled pass into a buffer on huge
    pages (:func:`mergekit_ftt.merge_methods.jit.unpack_signs`, ``unpack_sparse``); ``jit``
    False, or numba missing, takes torch, block by block (the same bits)."""
    info = folder.info(name)
    components = info.components
    if DENSE in components:
        return folder.component(name, DENSE)
    # Imported here: importing the method package registers the method with mergekit,
    # which imports the delta loader, which imports this module.
    from mergekit_ftt.merge_methods.cpu import as_bits, compiled, empty_on_huge_pages

    dtype = getattr(torch, folder.config.encoding.dtype)
    shape = tuple(info.shape)
    rows = shape[0]
    row_elements = math.prod(shape[1:])
    out = empty_on_huge_pages((rows, row_elements), dtype)
    unpack = compiled() if jit else None
    step = rows_per_block(row_elements, folder.config.encoding.block_elements or BLOCK_ELEMENTS)
    if MASK in components:
        mask, values = folder.component(name, MASK), folder.component(name, VALUES)
        if unpack is None:
            _unpack_sparse_blocks(out, mask, values, step, row_elements)
        elif unpack.unpack_sparse(as_bits(out), mask.numpy(), as_bits(values)) != values.numel():
            raise DeltaError(
                f"{folder.path}: {name}{MASK} and {name}{VALUES} disagree on how many values "
                "are kept: the files are damaged. Extract the delta again or copy the folder "
                "again."
            )
    else:
        signs, scale = folder.component(name, SIGN), folder.component(name, SCALE)
        if unpack is None:
            _unpack_sign_blocks(out, signs, scale, step, row_elements)
        else:
            magnitude = scale.to(dtype)
            unpack.unpack_signs(
                as_bits(out), signs.numpy(), as_bits(magnitude), as_bits(-magnitude), row_elements
            )
    if FULL_ROWS in components:
        out[info.full_rows] = folder.component(name, FULL_ROWS).reshape(-1, row_elements).to(dtype)
    return out.view(shape)


def _unpack_sparse_blocks(out, mask, values, step: int, row_elements: int) -> None:
    taken = 0
    for start in range(0, out.shape[0], step):
        block = out[start : start + step]
        bits = _block_bits(mask, start, block.numel(), row_elements).view(block.shape)
        block.zero_()
        count = int(bits.sum())
        block[bits] = values[taken : taken + count]
        taken += count


def _unpack_sign_blocks(out, signs, scale, step: int, row_elements: int) -> None:
    for start in range(0, out.shape[0], step):
        block = out[start : start + step]
        bits = _block_bits(signs, start, block.numel(), row_elements).view(block.shape)
        block_scale = scale[start : start + block.shape[0]] if scale.numel() > 1 else scale
        magnitude = block_scale.to(out.dtype).reshape(-1, 1).expand(block.shape)
        torch.where(bits, magnitude, -magnitude, out=block)


def _block_bits(packed: torch.Tensor, start_row: int, count: int, row_elements: int):
    # Blocks start on a multiple of 8 rows, so on a byte edge.
    first = start_row * row_elements // 8
    return unpack_bits(packed[first : first + math.ceil(count / 8)], count)
