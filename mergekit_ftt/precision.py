"""Which precision a ``finetuning_transfer`` merge runs at, so that no input is rounded early.

mergekit casts every input tensor to the recipe's ``dtype`` as it loads it, before any
merge method sees it. A float32 fine-tune merged with ``dtype: bfloat16`` would lose its
small updates before the delta is even taken. So when an input is stored in a dtype that
the merge dtype cannot hold exactly, the merge runs at a dtype that holds every input
(``dtype`` becomes, say, float32) and writes what the recipe asked for (``out_dtype``
becomes the recipe's ``out_dtype``, else its ``dtype``). The method's ``output_dtype``
parameter tells the kernel to round its float64 sum straight to that output dtype, so
mergekit's own cast to ``out_dtype`` afterwards changes nothing: one rounding in all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from mergekit.common import ModelReference, dtype_from_name
from mergekit.config import MergeConfiguration

from mergekit_ftt import METHOD_NAME


@dataclass(frozen=True)
class PrecisionPlan:
    """The configuration to run and, when it differs from the recipe's, a line saying how."""

    config: MergeConfiguration
    message: str | None = None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def holds_exactly(container: torch.dtype, dtype: torch.dtype) -> bool:
    """Every value of ``dtype`` is a value of ``container`` (bf16 ⊂ fp32, fp16 ⊄ bf16)."""
    return torch.promote_types(container, dtype) == container


def plan_precision(
    config: MergeConfiguration, stored: Mapping[ModelReference, Iterable[torch.dtype]]
) -> PrecisionPlan:
    """Choose ``dtype``, ``out_dtype`` and ``output_dtype`` for this merge.

    ``stored`` maps each input model to the floating-point dtypes its weight files store.
    The recipe is returned unchanged when it rounds nothing early and writes its merge
    dtype.
    """
    if config.merge_method != METHOD_NAME:
        return PrecisionPlan(config)
    merge_dtype = dtype_from_name(config.dtype)
    output = dtype_from_name(config.out_dtype) or merge_dtype
    wider = {}
    if merge_dtype is not None:  # without a dtype mergekit loads tensors as stored
        for model, dtypes in stored.items():
            if unheld := [d for d in set(dtypes) if not holds_exactly(merge_dtype, d)]:
                wider[model] = sorted(unheld, key=str)
    parameters = dict(config.parameters or {})
    if "output_dtype" not in parameters and output is not None and (wider or output != merge_dtype):
        # Round once, straight to what is written (dtype: float32 with out_dtype: bfloat16
        # would otherwise be rounded to float32 by the kernel and to bf16 by mergekit).
        parameters["output_dtype"] = dtype_name(output)
    if not wider:
        return PrecisionPlan(config.model_copy(update={"parameters": parameters}))
    container = merge_dtype
    for dtype in (d for dtypes in wider.values() for d in dtypes):
        container = torch.promote_types(container, dtype)
    inputs = "; ".join(
        f"{model} ({', '.join(dtype_name(d) for d in dtypes)})" for model, dtypes in wider.items()
    )
    return PrecisionPlan(
        config.model_copy(
            update={
                "dtype": dtype_name(container),
                "out_dtype": dtype_name(output),
                "parameters": parameters,
            }
        ),
        f"{METHOD_NAME}: inputs stored wider than dtype {dtype_name(merge_dtype)}: {inputs}. "
        f"Merging at {dtype_name(container)} and rounding the result once to "
        f"{dtype_name(output)}, so that no input is rounded before its delta is taken.",
    )
