"""The variants of a sweep, each a real mergekit recipe.

A variant scales the ``weight`` of every input whose role carries a delta
(``source_finetuned``, ``delta``) by α. On all tensors, the new weight is α times the old
setting (scalars and gradient lists alike). On one module kind only, it is a list of
per-tensor conditions, mergekit's own ``filter`` syntax, in front of the old setting::

    weight:
      - {filter: .mlp., value: 0.5}     # α · old weight on the MLP tensors
      - {value: 1.0}                    # the old weight everywhere else

so ``mergekit-yaml`` runs every variant's recipe as it stands. Module kinds are found by
the path components of the tensor names (``self_attn``, ``mlp``, ``embed_tokens`` …);
the filters are checked against every tensor of the model, and the planned weights of
each variant are checked against the intended ones before anything is merged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergekit_ftt import METHOD_NAME
from mergekit_ftt.errors import FttError
from mergekit_ftt.modules import KINDS, kind_component, kind_description, module_kind
from mergekit_ftt.recipe_file import read_recipe, require_transfer

if TYPE_CHECKING:
    from mergekit.config import MergeConfiguration

# Roles whose weight is the transferred delta's α (``delta``: a stored delta, issue 11).
SCALED_ROLES = ("source_finetuned", "delta")

ALL = "all"  # the kind of a variant that scales every tensor

# Path components (between dots) that put a tensor in a module kind; the first component
# of a name that appears here decides. Whole components only: Llama's
# ``post_attention_layernorm`` is a norm, not attention.
# The kinds --modules takes: every module kind but "other" (mergekit_ftt.modules).
MODULE_KINDS = tuple(kind for kind in KINDS if kind != "other")


def format_alpha(alpha: float) -> str:
    """The shortest text that reads back as ``alpha``: 1.0 → "1", 0.25 → "0.25"."""
    short = f"{alpha:g}"
    return short if float(short) == alpha else repr(alpha)


def parse_alphas(text: str) -> list[float]:
    """``"0,0.25,1.5"`` → [0.0, 0.25, 1.5]; an empty, repeated or non-numeric value is an error."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise FttError(
            f"--alphas {text!r} has an empty value; give comma-separated numbers, "
            "e.g. --alphas 0,0.25,0.5,0.75,1,1.25,1.5"
        )
    alphas = []
    for item in items:
        try:
            alpha = float(item)
        except ValueError:
            alpha = math.nan
        if not math.isfinite(alpha):
            raise FttError(
                f"--alphas: {item!r} is not a finite number; give comma-separated numbers, "
                "e.g. --alphas 0,0.5,1,1.5"
            )
        if alpha in alphas:
            raise FttError(f"--alphas lists {item} twice; give each value once")
        alphas.append(alpha)
    return alphas


def parse_kinds(text: str) -> list[str]:
    kinds = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [kind for kind in kinds if kind not in MODULE_KINDS]
    if not kinds or unknown:
        raise FttError(
            f"--modules {text!r}: choose from {', '.join(MODULE_KINDS)} (comma-separated)"
        )
    return list(dict.fromkeys(kinds))


def module_filters(tensor_names: Sequence[str], kind: str) -> tuple[str, ...]:
    """mergekit filters (substrings) that select exactly the tensors of ``kind``.

    The matched path components with their dots (``.self_attn.``, ``lm_head.``) when they
    select exactly those tensors among ``tensor_names``, else the full tensor names.
    """
    members = [name for name in tensor_names if module_kind(name) == kind]
    if not members:
        raise FttError(
            f"--modules {kind}: no tensor of this model is a {kind} tensor (looked for "
            f"{kind_description(kind)})"
        )
    filters: list[str] = []
    for name in members:
        components = name.split(".")
        index = kind_component(name)[1]
        text = components[index] + "."
        filters.append(text if index == 0 else "." + text)
    filters = list(dict.fromkeys(filters))
    selected = {name for name in tensor_names if any(f in name for f in filters)}
    return tuple(filters) if selected == set(members) else tuple(members)


# --- recipes ---------------------------------------------------------------------------


def load_recipe(path: Path) -> MergeConfiguration:
    """Read and check a recipe: a ``finetuning_transfer`` merge with a ``models:`` list."""
    config = read_recipe(path)
    require_transfer(
        config,
        path,
        f"ftt-sweep scales the delta weights of a {METHOD_NAME} recipe (roles "
        f"{', '.join(SCALED_ROLES)})",
    )
    if not config.models:
        raise FttError(
            f"{path} lists its inputs under slices:/modules:; ftt-sweep needs the `models:` "
            "list form (per-layer weights go in each model's `weight` as a gradient or filters)"
        )
    if not scaled_inputs(config):
        raise FttError(
            f"{path} has no input with role {' or '.join(SCALED_ROLES)}: nothing to scale"
        )
    return _absolute_local_paths(config)


def scaled_inputs(config: MergeConfiguration) -> list[int]:
    """Indices in ``models:`` of the inputs whose weight the sweep scales."""
    return [
        index
        for index, model_in in enumerate(config.models or [])
        if (model_in.parameters or {}).get("role") in SCALED_ROLES
    ]


def _absolute_local_paths(config: MergeConfiguration) -> MergeConfiguration:
    """Local model folders as absolute paths, so that a variant recipe runs from anywhere."""

    def absolute(reference):
        path = reference.model.path
        if Path(path).is_dir() and not Path(path).is_absolute():
            model = reference.model.model_copy(update={"path": str(Path(path).resolve())})
            return reference.model_copy(update={"model": model})
        return reference

    models = [m.model_copy(update={"model": absolute(m.model)}) for m in config.models or []]
    update: dict[str, Any] = {"models": models}
    if config.base_model is not None:
        update["base_model"] = absolute(config.base_model)
    if config.tokenizer is not None and not isinstance(config.tokenizer.source, str):
        update["tokenizer"] = config.tokenizer.model_copy(
            update={"source": absolute(config.tokenizer.source)}
        )
    return config.model_copy(update=update)


def _is_conditional(setting: Any) -> bool:
    from mergekit.config import ConditionalParameter

    return isinstance(setting, ConditionalParameter) or (
        isinstance(setting, list) and any(isinstance(s, ConditionalParameter) for s in setting)
    )


def _conditions(setting: Any) -> list:
    return [setting] if not isinstance(setting, list) else list(setting)


def _is_catch_all(condition) -> bool:
    return condition.filter in (None, "*")


def effective_weight(config: MergeConfiguration, index: int) -> Any:
    """The ``weight`` setting mergekit resolves for input ``index``, as one setting.

    mergekit looks at the model's own parameters, then the recipe's ``parameters:``, then
    the method's default, moving on when a list of filtered conditions matches nothing;
    the result is that chain flattened (conditions, then the first plain value).
    """
    from mergekit.config import ConditionalParameter

    own = (config.models[index].parameters or {}).get("weight")
    shared = (config.parameters or {}).get("weight")
    conditions: list = []
    for setting in (own, shared, _default_weight()):
        if setting is None or setting == []:
            continue
        if not _is_conditional(setting):
            if not conditions:
                return setting
            return [*conditions, ConditionalParameter(value=setting)]
        conditions += _conditions(setting)
        if any(_is_catch_all(c) for c in conditions):
            return conditions
    raise AssertionError("the method's default weight is a plain value")


def _default_weight() -> float:
    from mergekit_ftt.merge_methods.finetuning_transfer import finetuning_transfer

    (weight,) = (p for p in finetuning_transfer.spec.parameters if p.name == "weight")
    return weight.default


def scale(setting: Any, alpha: float) -> Any:
    """Every number in a weight setting (scalar, gradient, conditions) times ``alpha``."""
    from mergekit.config import ConditionalParameter

    if isinstance(setting, ConditionalParameter):
        return ConditionalParameter(filter=setting.filter, value=scale(setting.value, alpha))
    if isinstance(setting, list):
        return [scale(item, alpha) for item in setting]
    if isinstance(setting, bool):
        raise FttError(f"weight {setting!r} is not a number")
    try:
        return alpha * float(setting)
    except (TypeError, ValueError):
        raise FttError(f"weight {setting!r} is not a number") from None


def _first_match(setting: list, tensor_name: str) -> Any:
    """The value mergekit's filter rule picks from a condition list for ``tensor_name``."""
    for condition in setting:
        if _is_catch_all(condition) or condition.filter in tensor_name:
            return condition.value
    raise AssertionError("flattened weight conditions end with a catch-all")


def scaled_weight(
    setting: Any, alpha: float, filters: Sequence[str] | None, members: Sequence[str]
) -> Any:
    """``setting`` times ``alpha`` on all tensors (``filters`` None) or on one module kind.

    A plain setting gets the kind's filters in front; a setting that already has
    filtered conditions gets one condition per member tensor (full names), so that each
    keeps the value its own condition gave it, times α.
    """
    from mergekit.config import ConditionalParameter

    if filters is None:
        return scale(setting, alpha)
    if _is_conditional(setting):
        front = [
            ConditionalParameter(filter=name, value=scale(_first_match(setting, name), alpha))
            for name in members
        ]
        return front + _conditions(setting)
    front = [ConditionalParameter(filter=f, value=scale(setting, alpha)) for f in filters]
    return [*front, ConditionalParameter(value=setting)]


@dataclass(frozen=True)
class Variant:
    """One point of the sweep: α on every tensor (``kind`` "all") or on one module kind."""

    kind: str
    alpha: float
    recipe: MergeConfiguration

    @property
    def label(self) -> str:
        """The result folder's name, e.g. ``all@0.25`` or ``mlp@1.5``."""
        return f"{self.kind}@{format_alpha(self.alpha)}"

    def to_yaml(self, source: Path) -> str:
        where = "every tensor" if self.kind == ALL else f"the {self.kind} tensors"
        return (
            f"# ftt-sweep variant {self.label}: the weight of every {'/'.join(SCALED_ROLES)} "
            f"input\n# times α = {format_alpha(self.alpha)} on {where}; from {source}.\n"
            f"# Run it with: mergekit-yaml THIS_FILE OUTPUT_FOLDER\n" + self.recipe.to_yaml() + "\n"
        )


def make_variants(
    recipe: MergeConfiguration,
    alphas: Sequence[float],
    kinds: Sequence[str],
    tensor_names: Sequence[str],
) -> list[Variant]:
    """α on all tensors, then each kind's α ≠ 1 (at α = 1 a kind's variant is ``all@1``)."""
    filters = {kind: module_filters(tensor_names, kind) for kind in kinds}
    members = {kind: [n for n in tensor_names if module_kind(n) == kind] for kind in kinds}
    variants = [Variant(ALL, alpha, _scaled_recipe(recipe, alpha, None, ())) for alpha in alphas]
    for kind in kinds:
        variants += [
            Variant(kind, alpha, _scaled_recipe(recipe, alpha, filters[kind], members[kind]))
            for alpha in alphas
            if alpha != 1.0
        ]
    return variants


def _scaled_recipe(
    recipe: MergeConfiguration,
    alpha: float,
    filters: Sequence[str] | None,
    members: Sequence[str],
) -> MergeConfiguration:
    models = list(recipe.models or [])
    for index in scaled_inputs(recipe):
        parameters = dict(models[index].parameters or {})
        parameters["weight"] = scaled_weight(
            effective_weight(recipe, index), alpha, filters, members
        )
        models[index] = models[index].model_copy(update={"parameters": parameters})
    return recipe.model_copy(update={"models": models})
