"""Fine-tuning transfer (Lin et al., 2025): ``target + Σ_i weight_i · (finetuned_i − source_base)``.

``base_model`` is the *target* M_t. The other inputs carry a ``role``: ``source_finetuned``
models FT(M_s) with the one ``source_base`` M_s they were trained from, and/or ``delta``
folders that hold FT − M_s already (``ftt-delta extract``), each with its own ``weight``
(the paper's α, default 1). The deltas are measured against ``source_base``, never
against the target, which is what ``task_arithmetic`` with ±1 weights gets wrong once
deltas are sparsified or sign-elected.

The dense transfer is the exact sum rounded once to the merge dtype, in one fused pass
over memory (:mod:`mergekit_ftt.merge_methods.kernel` states the guarantee). With ``sparsification_method``
or ``consensus_method`` set, the deltas go through mergekit's own ``sparsify`` and TIES
sign election (``get_mask``), computed in float32 whatever the merge dtype and rounded
to the output dtype only at the end. (mergekit's ``ties``/``dare_ties``/``della`` compute
in the merge dtype, so in a bf16 merge every intermediate step is rounded to bf16.)
``rescale`` follows mergekit's defaults: on for ``random`` (DARE) and ``della_magprune``,
off for the magnitude methods.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Literal

import torch
from mergekit.common import dtype_from_name
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
from mergekit_ftt.delta.loader import StoredDelta, stored_delta
from mergekit_ftt.errors import FinetuningTransferError
from mergekit_ftt.merge_methods.kernel import Term, dense_transfer

# The floating-point dtypes mergekit reads by name (mergekit.common.dtype_from_name).
OutputDtype = Literal["float64", "float32", "bfloat16", "float16"]


class Role(str, Enum):
    source_base = "source_base"
    source_finetuned = "source_finetuned"
    delta = "delta"


@dataclass(frozen=True)
class Roles:
    """The non-target inputs by role. ``deltas`` are the ``source_finetuned`` and
    ``delta`` inputs in input order (the order of the sum), ``stored`` the delta folders."""

    source_base: Hashable | None
    deltas: list[Hashable]
    stored: frozenset[Hashable]

    @property
    def finetuned(self) -> list[Hashable]:
        return [model for model in self.deltas if model not in self.stored]


def split_roles(roles: Mapping[Hashable, object]) -> Roles:
    """Sort the inputs by role or raise with the fix.

    ``roles`` maps each non-target input to its ``role`` parameter. With no role on any
    input (mergekit's in-memory API, ``merge_state_dicts``/``merge_tensors``, called
    without ``parameters={"role": …}``), every non-target input is taken as a delta
    itself: the result is ``target + Σ weight · input``. A recipe run by ``mergekit-yaml``
    never gets there: its preflight asks for a role on every model
    (:func:`mergekit_ftt.preflight.recipe.configured_roles`).
    """
    if roles and all(role is None for role in roles.values()):
        return Roles(None, list(roles), frozenset(roles))
    unset = [model for model, role in roles.items() if role is None]
    if unset:
        raise FinetuningTransferError(
            f"{METHOD_NAME}: model {unset[0]} has no role while others have one; give every "
            f"model except the target a role (source_finetuned, source_base or delta), or none "
            f"to add the inputs to the target as deltas."
        )
    by_role: dict[str, list[Hashable]] = {role.value: [] for role in Role}
    deltas = []
    for model, role in roles.items():
        value = role.value if isinstance(role, Role) else role
        if value not in by_role:
            raise FinetuningTransferError(
                f"{METHOD_NAME}: model {model} has role {value!r}; every model except "
                f"base_model (the target) needs `parameters: {{role: source_finetuned}}`, "
                f"`{{role: source_base}}` or `{{role: delta}}` (a folder from ftt-delta extract)."
            )
        by_role[value].append(model)
        if value != Role.source_base.value:
            deltas.append(model)
    bases, finetuned = by_role[Role.source_base.value], by_role[Role.source_finetuned.value]
    stored = by_role[Role.delta.value]
    if bases and not finetuned and stored:
        raise FinetuningTransferError(
            f"{METHOD_NAME}: {bases[0]} has `role: source_base` but no model has `role: "
            f"source_finetuned`. A `role: delta` input already holds fine-tuned − base "
            f"({', '.join(str(d) for d in stored)}); remove the source_base entry."
        )
    if (finetuned and len(bases) != 1) or len(bases) > 1:
        found = "none" if not bases else ", ".join(str(b) for b in bases)
        raise FinetuningTransferError(
            f"{METHOD_NAME} needs exactly one model with `role: source_base` (the model the "
            f"fine-tuned models were trained from); found {found}. Give the source base "
            f"model `parameters: {{role: source_base}}`; the target goes in base_model."
        )
    if not deltas:
        raise FinetuningTransferError(
            f"{METHOD_NAME} needs at least one model with `role: source_finetuned` (the "
            f"fine-tuned model whose delta is transferred) or `role: delta` (a folder from "
            f"ftt-delta extract); only {bases[0] if bases else 'the target'} was given."
        )
    return Roles(bases[0] if bases else None, deltas, frozenset(stored))


def default_rescale(method: SparsificationMethod | None) -> bool:
    """mergekit's default: ``dare_*`` (``random``) and ``della*`` rescale, the others not."""
    return method in (SparsificationMethod.random, SparsificationMethod.della_magprune)


def _sparse_transfer(
    target: torch.Tensor,
    source_base: torch.Tensor | None,
    terms: list[Term],
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

    float32 whatever the merge dtype; the caller rounds the result to the output dtype.
    mergekit's TIES family computes the same steps in the merge dtype (bf16 in most
    recipes).
    """
    base32 = source_base.to(torch.float32) if source_base is not None else None
    deltas = torch.empty((len(terms), *target.shape), dtype=torch.float32, device=target.device)
    for index, term in enumerate(terms):
        if isinstance(term, StoredDelta):
            delta = term.exact(torch.float32)
        else:
            delta = term.to(torch.float32) - base32
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
    merged = target.to(torch.float32) + mixed
    for term in terms:
        if isinstance(term, StoredDelta) and term.full_rows:
            merged.view(merged.shape[0], -1)[list(term.full_rows)] = term.exact_rows().float()
    return merged


@merge_method(
    name=METHOD_NAME,
    pretty_name="Fine-tuning Transfer",
    reference_url=PAPER_URL,
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
)
def finetuning_transfer(
    group: TensorGroup,
    role: PerNonBase[str | None] = None,
    weight: PerNonBase[float] = 1.0,
    density: PerNonBase[float] = 1.0,
    epsilon: PerNonBase[float] = 0.15,
    gamma: PerNonBase[float] = 0.01,
    sparsification_method: SparsificationMethod | None = None,
    consensus_method: ConsensusMethod | None = None,
    rescale: bool | None = None,
    normalize: bool = False,
    output_dtype: OutputDtype | None = None,
) -> torch.Tensor:
    """Transfer the deltas ``finetuned − source_base`` and stored deltas onto the target.

    Without any ``role`` (the in-memory API), the non-target inputs are the deltas
    themselves (see :func:`split_roles`).

    ``weight``, ``density``, ``epsilon`` and ``gamma`` are read for ``source_finetuned``
    and ``delta`` inputs only; ``density``/``epsilon``/``gamma``/``rescale`` take effect with a
    ``sparsification_method``, ``normalize`` divides by the summed (sign-elected)
    weights as in TIES. ``rescale`` unset means mergekit's default for the
    sparsification method (:func:`default_rescale`). ``output_dtype`` is the dtype the
    result is rounded to, once (default: the dtype the inputs arrive in). mergekit-ftt
    sets it from the recipe's ``out_dtype`` (else ``dtype``) before a merge: mergekit
    would otherwise round the kernel's result a second time when it writes ``out_dtype``.
    """
    inputs = split_roles(role)
    entries = {entry.id: entry.tensor for entry in group.non_base}
    target = group.base.tensor
    terms = [
        stored_delta(model, entries[model], group.metadata.name)
        if model in inputs.stored
        else entries[model]
        for model in inputs.deltas
    ]
    source_base = entries[inputs.source_base] if inputs.source_base is not None else None
    weights = [weight[model] for model in inputs.deltas]
    rounded_to = dtype_from_name(output_dtype) or target.dtype
    if sparsification_method is None and consensus_method is None and not normalize:
        return dense_transfer(target, source_base, terms, weights, rounded_to)
    merged = _sparse_transfer(
        target,
        source_base,
        terms,
        weights,
        densities=[density[model] for model in inputs.deltas],
        sparsification_method=sparsification_method,
        consensus_method=consensus_method,
        rescale=default_rescale(sparsification_method) if rescale is None else rescale,
        normalize=normalize,
        epsilon=[epsilon[model] for model in inputs.deltas],
        gamma=[gamma[model] for model in inputs.deltas],
    )
    return merged.to(rounded_to)
