"""`finetuning_transfer` through mergekit's in-memory API, like every built-in method."""

from __future__ import annotations

import pytest
import torch
from mergekit.merge_methods.api import merge_state_dicts

from mergekit_ftt.errors import FinetuningTransferError


def tensors(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(5, 7, generator=generator, dtype=torch.float64) for _ in range(count)]


def merged(models: list[torch.Tensor], **parameters) -> torch.Tensor:
    states = [{"w": model} for model in models]
    return merge_state_dicts(states, "finetuning_transfer", base=0, parameters=parameters)["w"]


def test_with_roles_it_is_the_transfer():
    target, source_base, finetuned = tensors(3)
    out = merged([target, source_base, finetuned], role=["source_base", "source_finetuned"])
    expected = target + (finetuned - source_base)
    assert torch.equal(out, expected)


def test_without_roles_the_inputs_are_deltas_added_with_their_weights():
    target, first, second = tensors(3)
    out = merged([target, first, second], weight=[0.5, 2.0])
    assert torch.equal(out, target + (0.5 * first + 2.0 * second))


def test_some_roles_but_not_all_is_refused_with_the_fix():
    with pytest.raises(FinetuningTransferError, match="model 1 has no role while others"):
        merged(tensors(3), role=[None, "source_finetuned"])
