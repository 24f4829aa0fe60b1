"""What the recipe itself says: roles, the keys the method reads, the models it names.

Only the parsed recipe is read here; nothing touches a file or the network.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator

from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.merge_methods.base import ParameterScope
from mergekit.options import MergeOptions

from mergekit_ftt import METHOD_NAME
from mergekit_ftt.merge_methods.finetuning_transfer import (
    FinetuningTransferError,
    Role,
    finetuning_transfer,
)

# Keys people copy from mergekit's other methods, and what to do instead.
_KEY_HINTS = {
    "lambda": "Scale a delta with its model's `weight` (the paper's α) instead of `lambda`.",
    "int8_mask": "`int8_mask` only sets the dtype of mergekit's TIES sign mask: remove it.",
    "t": "`t` belongs to SLERP: chain a SLERP after the transfer with mergekit-multi.",
}


def configured_roles(config: MergeConfiguration, target: ModelReference) -> dict:
    roles: dict[ModelReference, object] = {}
    for model, parameters in model_entries(config):
        role = (parameters or {}).get("role")
        if model == target:
            if role is not None:
                raise FinetuningTransferError(
                    f"{model} is base_model, the target, and takes no role; the source "
                    "base model it was trained from is a separate entry with "
                    "`role: source_base`."
                )
            if parameters:
                raise FinetuningTransferError(
                    f"{model} is base_model, the target, and takes no parameters, but has "
                    f"{', '.join(f'`{k}`' for k in sorted(parameters))}: `weight` and the "
                    "sparsification settings go on each source_finetuned model."
                )
            continue
        if role is None:
            raise FinetuningTransferError(
                f"model {model} has no role: give it `parameters: {{role: source_finetuned}}` "
                f"(a fine-tuned model whose delta is transferred) or "
                f"`parameters: {{role: source_base}}` (the model it was fine-tuned from)."
            )
        if roles.get(model, role) != role:
            raise FinetuningTransferError(f"model {model} is listed with two roles.")
        roles[model] = role
    return roles


def check_parameter_keys(config: MergeConfiguration) -> None:
    """Refuse recipe keys the method does not read: mergekit would ignore them silently."""
    merge_wide, per_model = _method_parameters()
    for where, parameters in _merge_wide_parameters(config):
        _refuse_unread(set(parameters or {}) - {*merge_wide, *per_model}, where)
    for model, parameters in model_entries(config):
        if model != config.base_model:  # the target's entry: see configured_roles
            _check_model_keys(model, parameters or {})
    _check_sparsification_settings(config)


def _method_parameters() -> tuple[list[str], list[str]]:
    """The method's (merge-wide, per-model) parameter names, in the kernel's order.

    Per-model parameters may also be set at the top level, as defaults for every model.
    """
    parameters = finetuning_transfer.spec.parameters
    merge_wide = [p.name for p in parameters if p.scope == ParameterScope.SHARED]
    return merge_wide, [p.name for p in parameters if p.scope != ParameterScope.SHARED]


def _check_model_keys(model: ModelReference, parameters: dict) -> None:
    keys = set(parameters)
    merge_wide, per_model = _method_parameters()
    misplaced = sorted(keys & set(merge_wide))
    if misplaced:
        raise FinetuningTransferError(
            f"{', '.join(f'`{k}`' for k in misplaced)} under model {model} is a setting of "
            "the whole merge, which mergekit reads only from the top-level `parameters:`: "
            "move it there."
        )
    extra = sorted(keys - {"role"})
    if parameters.get("role") == Role.source_base.value and extra:
        raise FinetuningTransferError(
            f"model {model} is the source_base and takes only `role`, but has "
            f"{', '.join(f'`{k}`' for k in extra)}: the delta is finetuned − source_base, "
            "so `weight`, `density`, … go on each source_finetuned model."
        )
    _refuse_unread(keys - set(per_model), f"the parameters of {model}")


# Read only together with a `sparsification_method`; without one they change nothing.
_SPARSIFICATION_SETTINGS = ("density", "rescale", "gamma", "epsilon")


def _check_sparsification_settings(config: MergeConfiguration) -> None:
    merge_wide = [parameters or {} for _, parameters in _merge_wide_parameters(config)]
    if any(p.get("sparsification_method") is not None for p in merge_wide):
        return
    given = {
        key
        for parameters in [*merge_wide, *(p or {} for _, p in model_entries(config))]
        for key in _SPARSIFICATION_SETTINGS
        if key in parameters
    }
    if given:
        raise FinetuningTransferError(
            f"{', '.join(f'`{k}`' for k in sorted(given))} "
            f"{'takes' if len(given) == 1 else 'take'} effect only with a "
            "`sparsification_method` in the top-level `parameters:` (`magnitude` as in "
            "TIES, `random` as in DARE, `magnitude_outliers`, `della_magprune`); without "
            "one the whole delta is transferred. Add one, or remove them."
        )


def _refuse_unread(keys: set[str], where: str) -> None:
    if not keys:
        return
    merge_wide, per_model = _method_parameters()
    hints = []
    for key in sorted(keys):
        if key in _KEY_HINTS:
            hints.append(_KEY_HINTS[key])
        elif close := difflib.get_close_matches(key, [*merge_wide, *per_model], n=1):
            hints.append(f"Did you mean `{close[0]}` for `{key}`?")
    raise FinetuningTransferError(
        f"{METHOD_NAME} does not read {', '.join(f'`{k}`' for k in sorted(keys))} in "
        f"{where}; mergekit would ignore {'it' if len(keys) == 1 else 'them'} silently. "
        f"It reads, in the top-level `parameters:`, {', '.join(merge_wide)}; per model, "
        f"{', '.join(per_model)}." + "".join(f" {hint}" for hint in hints)
    )


def _merge_wide_parameters(config: MergeConfiguration) -> Iterator[tuple[str, dict | None]]:
    yield "the top-level `parameters:`", config.parameters
    for output_slice in config.slices or []:
        yield "a slice's `parameters:`", output_slice.parameters
    for name, module in (config.modules or {}).items():
        yield f"the `parameters:` of module {name}", module.parameters
        for output_slice in module.slices or []:
            yield f"a slice's `parameters:` in module {name}", output_slice.parameters


def model_entries(config: MergeConfiguration) -> Iterator[tuple[ModelReference, dict | None]]:
    for model_in in config.models or []:
        yield model_in.model, model_in.parameters
    for output_slice in config.slices or []:
        for source in output_slice.sources:
            yield source.model, source.parameters
    for module in (config.modules or {}).values():
        for model_in in module.models or []:
            yield model_in.model, model_in.parameters
        for output_slice in module.slices or []:
            for source in output_slice.sources:
                yield source.model, source.parameters


def referenced_models(config: MergeConfiguration) -> list[ModelReference]:
    """Every model the merge reads, in recipe order: target, inputs, tokenizer sources."""
    models = [config.base_model] if config.base_model is not None else []
    models += [model for model, _ in model_entries(config)]
    models += [s.base_model for s in config.slices or [] if s.base_model is not None]
    if isinstance(config.tokenizer_source, ModelReference):
        models.append(config.tokenizer_source)
    if config.tokenizer is not None:
        if isinstance(config.tokenizer.source, ModelReference):
            models.append(config.tokenizer.source)
        for token in (config.tokenizer.tokens or {}).values():
            source = getattr(token.source, "model", token.source)
            if isinstance(source, ModelReference):
                models.append(source)
    return list(dict.fromkeys(models))


def check_lora_cache(config: MergeConfiguration, options: MergeOptions) -> None:
    if options.lora_merge_cache:
        return
    for model in referenced_models(config):
        if model.lora is not None:
            raise FinetuningTransferError(
                f"{model} is the LoRA adapter {model.lora} on {model.model}: mergekit merges "
                "the adapter into its base first and keeps that merged copy in a folder you "
                "choose. Add `--lora-merge-cache DIR` to the command (for example "
                "`--lora-merge-cache ~/.cache/mergekit-lora`; later merges reuse it)."
            )
