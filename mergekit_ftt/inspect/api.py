"""``inspect_recipe``: everything ``ftt-inspect`` reports, as the dictionary it writes as JSON."""

from __future__ import annotations

from pathlib import Path

from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_ftt.inspect import compatibility
from mergekit_ftt.inspect.checkpoint import Checkpoint
from mergekit_ftt.inspect.recipe import load_recipe
from mergekit_ftt.inspect.statistics import aggregate, stream_statistics
from mergekit_ftt.inspect.verdict import judge
from mergekit_ftt.recipe_file import read_recipe

FORMAT = "ftt-inspect/1"


def inspect_recipe(
    recipe: str | Path | MergeConfiguration,
    options: MergeOptions | None = None,
    progress: bool = True,
    path: str | Path | None = None,
) -> dict:
    """Check a ``finetuning_transfer`` recipe and measure its delta against its target.

    ``recipe`` is a recipe file (what ``mergekit-yaml`` takes) or a parsed configuration
    (``path``: the file it came from, for messages). Raises
    :class:`mergekit_ftt.errors.FttError` with the merge's own preflight message if the
    merge could not run. The result is the JSON document ``ftt-inspect --json`` writes
    (keys: docs/inspect.md).
    """
    options = options or MergeOptions()
    if not isinstance(recipe, MergeConfiguration):
        path = recipe
        recipe = read_recipe(recipe)
    path = None if path is None else str(path)
    loaded = load_recipe(recipe, options, path)
    labelled = compatibility.roles(loaded)
    checkpoints = {
        model: Checkpoint(loaded.inputs.checkpoints[model]) for model in labelled.values()
    }
    tokenizers = {
        role: compatibility.load_tokenizer(model, options) for role, model in labelled.items()
    }
    tensors = compatibility.tensors(loaded, checkpoints)
    vocabulary_rows = [
        rows for entry in tensors["inputs"].values() for rows in entry["vocabulary_rows"].values()
    ]
    aligned = None
    if vocabulary_rows and any(t.aligned_by_token for t in loaded.tensors):
        aligned = compatibility.aligned_rows(tokenizers, min(vocabulary_rows))
    statistics = aggregate(
        stream_statistics(loaded.tensors, checkpoints, loaded.config.dtype, aligned, progress)
    )
    chat = compatibility.chat(loaded, tokenizers, options)
    return {
        "format": FORMAT,
        "recipe": path,
        "models": {
            "target": str(loaded.inputs.target),
            "source_base": str(loaded.inputs.source_base),
            "source_finetuned": [
                {"model": str(model), "weight": _weights(loaded, index)}
                for index, model in enumerate(loaded.inputs.source_finetuned)
            ],
        },
        "compatibility": {
            "architecture": compatibility.architecture(loaded, options),
            "tensors": tensors,
            "merge_dtype": loaded.config.dtype,
            "out_dtype": loaded.config.out_dtype,
            "vocabulary": compatibility.vocabulary(loaded, tokenizers),
            "chat": chat,
            "notes": [
                *([loaded.inputs.precision_note] if loaded.inputs.precision_note else []),
                *([loaded.inputs.rows_note] if loaded.inputs.rows_note else []),
                *chat["notes"],
            ],
        },
        "statistics": statistics,
        "verdict": judge(
            statistics,
            {d for entry in tensors["inputs"].values() for d in entry["stored_dtypes"]},
            _delta_methods(loaded.config),
        ),
    }


def _weights(loaded, index: int) -> float | dict[str, float]:
    """The weight α of one fine-tuned model: a number, or per tensor where it varies."""
    per_tensor = {t.name: t.finetuned[index][1] for t in loaded.tensors}
    values = set(per_tensor.values())
    return values.pop() if len(values) == 1 else per_tensor


def _delta_methods(config) -> list[str]:
    """The recipe's sparsification / sign election, which the verdict's calibration never saw."""
    parameters = config.parameters or {}
    return [
        f"{key} {parameters[key]}"
        for key in ("sparsification_method", "consensus_method")
        if parameters.get(key) is not None
    ]
