"""``ftt-delta extract``'s options: one pydantic model, its flags generated from it
(:func:`mergekit_ftt.cli.add_options`), as mergekit does with ``MergeOptions``.

An option that has no effect with the others given is refused, never accepted and then
ignored: which flags were given is pydantic's ``model_fields_set`` (``options_from`` passes
only those).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, model_validator

from mergekit_ftt.errors import DeltaError

DTYPES = ("bfloat16", "float16", "float32", "float64")
SPARSE = ("magnitude", "dare")
# The compressions each option takes effect with.
APPLIES_TO = {
    "exact": ("none",),
    "density": SPARSE,
    "rescale": SPARSE,
    "seed": ("dare",),
    "scale": ("sign",),
}


class ExtractOptions(BaseModel):
    """How ftt-delta extract stores Δ."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dtype: Literal[DTYPES] | None = Field(
        None, description="stored precision of Δ (default: the fine-tuned model's dtype)"
    )
    exact: bool = Field(
        True,
        description="dense: also store exactly the elements --dtype rounds, so the transfer "
        "is bit-identical (--no-exact: Δ rounded to --dtype only)",
    )
    compress: Literal["none", "magnitude", "dare", "sign"] = Field(
        "none",
        description="magnitude / dare: sparse through mergekit's sparsify (needs --density); "
        "sign: 1 bit per element and a scale (BitDelta without distillation)",
    )
    density: float | None = Field(
        None, gt=0, le=1, description="magnitude / dare: the fraction of elements kept"
    )
    rescale: bool | None = Field(
        None,
        description="magnitude / dare: rescale kept values to Δ's L1 norm (default: on for "
        "dare, off for magnitude)",
    )
    scale: Literal["row", "matrix"] = Field("row", description="sign: a scale per row or matrix")
    seed: int = Field(0, description="dare: random seed")
    shard_size: ByteSize = Field(ByteSize(1000**3), description="bytes per file, e.g. 500MB")
    source_hash: bool = Field(
        True,
        description="record the sha256 of the two models' weights in delta_config.json "
        "(--no-source-hash: skip)",
    )
    overwrite: bool = Field(False, description="replace a delta folder in OUT_DIR")

    @model_validator(mode="after")
    def _takes_effect(self) -> ExtractOptions:
        if self.compress in SPARSE and self.density is None:
            raise DeltaError(
                f"--compress {self.compress} needs --density in (0, 1], the fraction of "
                "elements kept (e.g. --density 0.1)."
            )
        for name, compressions in APPLIES_TO.items():
            if name in self.model_fields_set and self.compress not in compressions:
                flag = "--no-exact" if name == "exact" else f"--{name}"
                needs = " or ".join(f"--compress {c}" for c in compressions)
                raise DeltaError(
                    f"{flag} takes effect only with {needs}, not with --compress "
                    f"{self.compress}; remove it or change --compress."
                )
        return self
