"""Which tensors of the fine-tuned model and its base pair up, and how their vocabulary rows
align: the plan ``ftt-delta extract`` follows, made from the two models' indexes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mergekit_ftt.delta.format import Vocabulary
from mergekit_ftt.errors import DeltaError

if TYPE_CHECKING:
    from mergekit_ftt.delta.source import Source


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
