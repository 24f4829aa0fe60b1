"""A ``finetuning_transfer`` recipe as mergekit reads it: models by role and the tensor plan.

The recipe is parsed with mergekit's own :class:`MergeConfiguration` and checked by the
merge's preflight (:func:`mergekit_ftt.preflight.check_inputs`), so a recipe that
``mergekit-yaml`` would refuse is refused here with the same message. The tensors, and
the weight α of every fine-tuned model for each tensor (gradients and filters
included), come from mergekit's :class:`MergePlanner`: the plan is built, never run.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_ftt import METHOD_NAME
from mergekit_ftt.errors import FttError
from mergekit_ftt.preflight import TransferInputs, check_inputs
from mergekit_ftt.recipe_file import require_transfer

ROLES_NEEDED = (
    "base_model: the target M_t that receives the delta; one model with "
    "`parameters: {role: source_base}` (M_s, the model the fine-tuned one was trained "
    "from); one or more with `parameters: {role: source_finetuned, weight: α}` (FT(M_s))"
)


@dataclass(frozen=True)
class TensorSource:
    """Where one input's tensor is found: the name and the names mergekit also accepts."""

    model: ModelReference
    names: tuple[str, ...]


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor of the merge and the inputs it is computed from."""

    name: str
    target: TensorSource
    source_base: TensorSource
    finetuned: tuple[tuple[TensorSource, float], ...]  # (source, weight α) per fine-tuned model
    vocabulary_axis: int | None
    aligned_by_token: bool  # a tokenizer section: mergekit aligns vocabulary rows by token


@dataclass(frozen=True)
class Recipe:
    path: str | None
    inputs: TransferInputs  # the models by role and the configuration the merge would run
    tensors: tuple[PlannedTensor, ...]

    @property
    def config(self) -> MergeConfiguration:
        """The configuration ``mergekit-yaml`` would run: the recipe with the precision the
        preflight chose (``dtype`` raised where an input would otherwise be rounded)."""
        return self.inputs.config


def load_recipe(config: MergeConfiguration, options: MergeOptions, path: str | None) -> Recipe:
    """Check the recipe with the merge's preflight and plan its tensors."""
    require_transfer(
        config,
        path,
        f"ftt-inspect reads {METHOD_NAME} recipes, which name the roles of a transfer: "
        f"{ROLES_NEEDED}",
    )
    inputs = check_inputs(config, options)
    if inputs.deltas:
        raise FttError(
            f"{path or 'the recipe'} applies a stored delta ({inputs.deltas[0]}); ftt-inspect "
            "compares the target with the delta's source base, so give it the recipe with "
            "the fine-tuned model and its base (`ftt-delta info` describes the delta itself)."
        )
    return Recipe(path, inputs, tuple(plan_tensors(inputs.config, options, inputs)))


def plan_tensors(
    config: MergeConfiguration, options: MergeOptions, inputs: TransferInputs
) -> list[PlannedTensor]:
    """mergekit's plan of the merge, read for its tensors and per-tensor parameters."""
    from mergekit.tokenizer.embed import PermutedVocabulary

    from mergekit_ftt.mergekit_adapter import plan_save_tasks

    tasks = plan_save_tasks(config, options)
    planned = []
    for task in tasks:
        merge = task.tensor_task
        gather = merge.gather_tensors
        aligned = isinstance(gather, PermutedVocabulary)
        weight_info = (gather.gather_tensors if aligned else gather).weight_info

        def source(model: ModelReference, weight_info=weight_info) -> TensorSource:
            info = weight_info[model]
            return TensorSource(model, (info.name, *(info.aliases or ()), *(info.tied_names or ())))

        parameters = merge.input_parameters
        planned.append(
            PlannedTensor(
                name=task.tensor_name,
                target=source(inputs.target),
                source_base=source(inputs.source_base),
                finetuned=tuple(
                    (source(model), float(parameters[model]["weight"]))
                    for model in inputs.source_finetuned
                ),
                vocabulary_axis=merge.output_weight.vocabulary_axis,
                aligned_by_token=aligned,
            )
        )
    return planned
