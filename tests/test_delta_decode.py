"""The compiled decoder of sign and sparse deltas (``jit.unpack_signs``, ``unpack_sparse``)
against the torch blocks it replaces, bit for bit, on shapes whose rows split bytes."""

from __future__ import annotations

import pytest
import torch

from mergekit_ftt.delta.encode import (
    _unpack_sign_blocks,
    _unpack_sparse_blocks,
    pack_bits,
    rows_per_block,
)
from mergekit_ftt.merge_methods import jit
from mergekit_ftt.merge_methods.cpu import as_bits

DECODE_SHAPES = [(16, 13), (9, 1000), (1, 5)]  # 13 and 5: rows that split bytes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("rows", "row_elements"), DECODE_SHAPES)
def test_compiled_sign_decoding_equals_torchs(dtype, rows, row_elements):
    generator = torch.Generator().manual_seed(rows * row_elements)
    signs = pack_bits(torch.rand(rows * row_elements, generator=generator) < 0.5)
    # a zero scale (±0 both ways), one halfway between two bf16 values (ties to even), tiny
    per_row = torch.rand(rows, generator=generator) * 1e-3
    per_row[0] = 0.0
    per_row[-1] = 1 + 2**-8
    for scale in (per_row, per_row[-1:].clone(), torch.tensor([3e-9])):
        expected = torch.empty((rows, row_elements), dtype=dtype)
        _unpack_sign_blocks(expected, signs, scale, rows_per_block(row_elements), row_elements)
        got = torch.empty((rows, row_elements), dtype=dtype)
        magnitude = scale.to(dtype)
        jit.unpack_signs(
            as_bits(got), signs.numpy(), as_bits(magnitude), as_bits(-magnitude), row_elements
        )
        assert torch.equal(as_bits_tensor(got), as_bits_tensor(expected)), scale


@pytest.mark.parametrize("density", [0.0, 0.3, 0.97, 1.0])
@pytest.mark.parametrize(("rows", "row_elements"), DECODE_SHAPES)
def test_compiled_sparse_decoding_equals_torchs(density, rows, row_elements):
    generator = torch.Generator().manual_seed(rows + row_elements)
    kept = torch.rand(rows * row_elements, generator=generator) < density
    mask = pack_bits(kept)
    values = torch.randn(int(kept.sum()), generator=generator).bfloat16()
    values[:1] = -0.0  # a kept −0 stays −0
    expected = torch.full((rows, row_elements), float("nan"), dtype=torch.bfloat16)
    _unpack_sparse_blocks(expected, mask, values, rows_per_block(row_elements), row_elements)
    got = torch.full((rows, row_elements), float("nan"), dtype=torch.bfloat16)
    assert jit.unpack_sparse(as_bits(got), mask.numpy(), as_bits(values)) == values.numel()
    assert torch.equal(as_bits_tensor(got), as_bits_tensor(expected))
    if values.numel():  # a damaged file: one value fewer than the mask keeps
        short = values[:-1].clone()
        assert jit.unpack_sparse(as_bits(got), mask.numpy(), as_bits(short)) == values.numel()


def as_bits_tensor(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view({2: torch.int16, 4: torch.int32}[tensor.element_size()])
