"""Fine-tuning transfer (Lin et al., 2025): ``target + Σ_i weight_i · (finetuned_i − source_base)``.

``base_model`` is the *target* M_t. The other inputs carry a ``role``: exactly one
``source_base`` M_s and one or more ``source_finetuned`` FT(M_s), each with its own
``weight`` (the paper's α, default 1). The deltas are measured against ``source_base``,
never against the target, which is what ``task_arithmetic`` with ±1 weights gets wrong
once deltas are sparsified or sign-elected.

The dense transfer is computed in float64, chunk by chunk, and rounded once to the
merge dtype: the output is bit-identical to a float64 reference rounded to the output
dtype, and no float copy of a whole input is ever made. With ``sparsification_method``
or ``consensus_method`` set, the deltas go through mergekit's own ``sparsify`` and TIES
sign election (``get_mask``), computed in float32 whatever the merge dtype and converted
to it only at the end. (mergekit's ``ties``/``dare_ties``/``della`` compute in the merge
dtype, so in a bf16 merge every intermediate step is rounded to bf16.) ``rescale`` follows mergekit's defaults:
on for ``random`` (DARE) and ``della_magprune``, off for the magnitude methods.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from enum import Enum

import click
import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    InputContract,
    PerNonBase,
    TensorGroup,
)
from mergekit.merge_methods.easy_define import merge_method
from mergekit.merge_methods.generalized_task_arithmetic import ConsensusMethod, get_mask
from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify

from mergekit_ftt import METHOD_NAME, PAPER_URL

# Elements per float64 work chunk: a 16 MiB buffer, allocated once per tensor and reused
# for each chunk, stays in the last-level cache, so every pass over a chunk runs at cache
# speed and only the inputs and the output cross memory once; 2M elements rather than
# fewer keeps thread barriers rare when -j > 1 (benchmarks/PROFILE.md has the numbers).
CHUNK_ELEMENTS = 1 << 21


class Role(str, Enum):
    source_base = "source_base"
    source_finetuned = "source_finetuned"


class FinetuningTransferError(click.ClickException, ValueError):
    """A ``finetuning_transfer`` configuration that cannot be merged.

    mergekit's commands are click commands: a ``ClickException`` reaches the user as
    ``Error: <message>`` with exit status 1 instead of a traceback.
    """


def split_roles(roles: Mapping[Hashable, object]) -> tuple[Hashable, list[Hashable]]:
    """Return ``(source_base, [source_finetuned, ...])`` or raise with the fix.

    ``roles`` maps each non-target input to its ``role`` parameter.
    """
    by_role: dict[str, list[Hashable]] = {role.value: [] for role in Role}
    for model, role in roles.items():
        value = role.value if isinstance(role, Role) else role
        if value not in by_role:
            raise FinetuningTransferError(
                f"{METHOD_NAME}: model {model} has role {value!r}; every model except "
                f"base_model (the target) needs `parameters: {{role: source_base}}` or "
                f"`parameters: {{role: source_finetuned}}`."
            )
        by_role[value].append(model)
    bases, finetuned = by_role[Role.source_base.value], by_role[Role.source_finetuned.value]
    if len(bases) != 1:
        found = "none" if not bases else ", ".join(str(b) for b in bases)
        raise FinetuningTransferError(
            f"{METHOD_NAME} needs exactly one model with `role: source_base` (the model the "
            f"fine-tuned models were trained from); found {found}. Give the source base "
            f"model `parameters: {{role: source_base}}`; the target goes in base_model."
        )
    if not finetuned:
        raise FinetuningTransferError(
            f"{METHOD_NAME} needs at least one model with `role: source_finetuned` (the "
            f"fine-tuned model whose delta is transferred); only {bases[0]} was given."
        )
    return bases[0], finetuned


def _dense_transfer(
    target: torch.Tensor,
    source_base: torch.Tensor,
    finetuned: list[torch.Tensor],
    weights: list[float],
) -> torch.Tensor:
    out = torch.empty_like(target, memory_format=torch.contiguous_format)
    flat_out = out.view(-1)
    flat_base = source_base.reshape(-1)
    flat_target = target.reshape(-1)
    flat_finetuned = [tensor.reshape(-1) for tensor in finetuned]
    # Scratch allocated once per tensor; the in-place ops on mixed dtypes compute in
    # float64 and convert the bf16/fp16 operand on the fly, so no float64 copy of an
    # input chunk is ever made. The operations and their order are those of
    # w₁·(ft₁ − sb) + w₂·(ft₂ − sb) + … + target in float64, rounded once by the last copy_.
    size = min(CHUNK_ELEMENTS, flat_out.numel())
    delta_sum = torch.empty(size, dtype=torch.float64, device=target.device)
    delta = torch.empty_like(delta_sum) if len(finetuned) > 1 else None
    for start in range(0, flat_out.numel(), CHUNK_ELEMENTS):
        window = slice(start, start + CHUNK_ELEMENTS)
        count = min(CHUNK_ELEMENTS, flat_out.numel() - start)
        chunk_sum = delta_sum[:count]
        for index, (tensor, weight) in enumerate(zip(flat_finetuned, weights, strict=True)):
            chunk_delta = delta[:count] if index else chunk_sum
            chunk_delta.copy_(tensor[window]).sub_(flat_base[window])
            if weight != 1.0:
                chunk_delta.mul_(weight)
            if index:
                chunk_sum.add_(chunk_delta)
        flat_out[window].copy_(chunk_sum.add_(flat_target[window]))
    return out


def default_rescale(method: SparsificationMethod | None) -> bool:
    """mergekit's default: ``dare_*`` (``random``) and ``della*`` rescale, the others not."""
    return method in (SparsificationMethod.random, SparsificationMethod.della_magprune)


def _sparse_transfer(
    target: torch.Tensor,
    source_base: torch.Tensor,
    finetuned: list[torch.Tensor],
    weights: list[float],
    densities: list[float],
    sparsification_method: SparsificationMethod | None,
    consensus_method: ConsensusMethod | None,
    rescale: bool,
    normalize: bool,
    epsilon: list[float],
    gamma: list[float],
) -> torch.Tensor:
    """The deltas, sparsified and sign-elected with mergekit's own functions, in float32.

    float32 whatever the merge dtype, converted to it only at the end; mergekit's TIES
    family computes the same steps in the merge dtype (bf16 in most recipes).
    """
    base32 = source_base.to(torch.float32)
    deltas = torch.empty((len(finetuned), *target.shape), dtype=torch.float32, device=target.device)
    for index, tensor in enumerate(finetuned):
        delta = tensor.to(torch.float32) - base32
        if sparsification_method is not None:
            delta = sparsify(
                delta,
                density=densities[index],
                method=sparsification_method,
                gamma=gamma[index],
                epsilon=epsilon[index],
                rescale_norm=RescaleNorm.l1 if rescale else None,
            )
        deltas[index] = delta
    del base32
    weight_tensor = torch.tensor(weights, dtype=torch.float32, device=target.device)
    weight_tensor = weight_tensor.view(len(weights), *(1,) * target.dim())
    deltas.mul_(weight_tensor)
    if consensus_method is not None:
        mask = get_mask(deltas, method=consensus_method.value)
        deltas.mul_(mask)
        divisor = (weight_tensor * mask).sum(dim=0)
    else:
        divisor = weight_tensor.sum(dim=0).expand(target.shape)
    mixed = deltas.sum(dim=0)
    if normalize:
        mixed /= torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    return (target.to(torch.float32) + mixed).to(target.dtype)


@merge_method(
    name=METHOD_NAME,
    pretty_name="Fine-tuning Transfer",
    reference_url=PAPER_URL,
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=2),
)
def finetuning_transfer(
    group: TensorGroup,
    role: PerNonBase[str],
    weight: PerNonBase[float] = 1.0,
    density: PerNonBase[float] = 1.0,
    epsilon: PerNonBase[float] = 0.15,
    gamma: PerNonBase[float] = 0.01,
    sparsification_method: SparsificationMethod | None = None,
    consensus_method: ConsensusMethod | None = None,
    rescale: bool | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """Transfer the deltas ``finetuned − source_base`` onto the target (the base input).

    ``weight``, ``density``, ``epsilon`` and ``gamma`` are read for ``source_finetuned``
    inputs only; ``density``/``epsilon``/``gamma``/``rescale`` take effect with a
    ``sparsification_method``, ``normalize`` divides by the summed (sign-elected)
    weights as in TIES. ``rescale`` unset means mergekit's default for the
    sparsification method (:func:`default_rescale`).
    """
    source_base_id, finetuned_ids = split_roles(role)
    entries = {entry.id: entry.tensor for entry in group.non_base}
    target = group.base.tensor
    finetuned = [entries[model] for model in finetuned_ids]
    weights = [weight[model] for model in finetuned_ids]
    if sparsification_method is None and consensus_method is None and not normalize:
        return _dense_transfer(target, entries[source_base_id], finetuned, weights)
    return _sparse_transfer(
        target,
        entries[source_base_id],
        finetuned,
        weights,
        densities=[density[model] for model in finetuned_ids],
        sparsification_method=sparsification_method,
        consensus_method=consensus_method,
        rescale=default_rescale(sparsification_method) if rescale is None else rescale,
        normalize=normalize,
        epsilon=[epsilon[model] for model in finetuned_ids],
        gamma=[gamma[model] for model in finetuned_ids],
    )
