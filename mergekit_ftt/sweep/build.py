"""The variants' weights, from one read of the inputs, through mergekit's own plan.

Every variant is planned by mergekit's ``MergePlanner`` from its recipe and executed by
mergekit's ``Executor``, so each output tensor comes out of the same
``finetuning_transfer`` kernel that ``mergekit-yaml`` runs on that recipe, bit for bit.
What changes is where the inputs come from and where the outputs go:

- :func:`read_once` puts a caching loader in front of each input in mergekit's
  ``LoaderCache``: the first variant reads a tensor from disk, every later variant gets
  the same tensor from memory, so the checkpoints are read once per sweep.
- :class:`InMemoryModel`: one transformers model for the whole sweep; each variant's
  tensors are copied into it as the executor yields them, and lm-eval's hf backend gets
  the model object. No variant is written to disk.
- :func:`write_variant`: mergekit's ``run_merge`` (with this package's checks and
  generation config) writes a variant to a folder, for vLLM or a model that does not fit
  in memory; the caller deletes it after evaluation.
- :func:`write_model_files`: what ``mergekit-yaml`` writes besides the weights (config,
  tokenizer, generation config), once per sweep, for the in-memory model.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mergekit_ftt.errors import FttError
from mergekit_ftt.modules import module_kind
from mergekit_ftt.sweep.grid import ALL, Variant

if TYPE_CHECKING:
    import torch
    from mergekit.common import ModelReference
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import SaveTensor
    from mergekit.options import MergeOptions


def merge_options(trust_remote_code: bool = False) -> MergeOptions:
    """mergekit-yaml's defaults, quiet (the sweep draws its own progress)."""
    from mergekit.options import MergeOptions

    return MergeOptions(quiet=True, trust_remote_code=trust_remote_code)


# Recipes checked by the preflight, by the recipe without its per-model weights and the
# options: a sweep's variants differ only in weights, so the preflight (which reads every
# checkpoint's headers) runs once per sweep, not once per variant.
_CHECKED: dict[str, tuple[MergeConfiguration, str]] = {}


def runnable(recipe: MergeConfiguration, options: MergeOptions) -> tuple[MergeConfiguration, str]:
    """The configuration ``mergekit-yaml`` runs for ``recipe``, and the preflight's note.

    This package's ``run_merge`` hook checks every merge with the preflight, which may also
    change its precision (:mod:`mergekit_ftt.precision`: merge at a dtype that holds every
    input, round once to the recipe's). The same check here keeps in-memory variants equal
    to written ones. Its note (printed by the hook) is returned instead, to be shown once.
    The preflight changes only merge-wide settings and model paths, never a model's
    parameters, so a variant's configuration is the checked recipe with its own weights.
    """
    from mergekit_ftt.preflight import check_merge

    key = _without_weights(recipe) + options.model_dump_json()
    if key not in _CHECKED:
        note = io.StringIO()
        with contextlib.redirect_stderr(note):
            # os.devnull: no output folder to check, only the merge itself.
            config = check_merge(recipe.model_copy(deep=True), os.devnull, options)
        _CHECKED[key] = config, note.getvalue().strip()
    checked, note = _CHECKED[key]
    models = [
        checked_model.model_copy(update={"parameters": model.parameters})
        for checked_model, model in zip(checked.models or [], recipe.models or [], strict=True)
    ]
    return checked.model_copy(update={"models": models or checked.models}), note


def _without_weights(recipe: MergeConfiguration) -> str:
    models = [
        model.model_copy(
            update={
                "parameters": {k: v for k, v in (model.parameters or {}).items() if k != "weight"}
            }
        )
        for model in recipe.models or []
    ]
    return recipe.model_copy(update={"models": models or recipe.models}).to_yaml()


def plan(recipe: MergeConfiguration, options: MergeOptions) -> list[SaveTensor]:
    """mergekit's plan of ``recipe`` as ``mergekit-yaml`` runs it (see :func:`runnable`):
    one ``SaveTensor`` per output tensor (the writer task they name is never run here)."""
    from mergekit_ftt.mergekit_adapter import plan_save_tasks

    config, _ = runnable(recipe, options)
    return plan_save_tasks(config, options)


def planned_weights(tasks: Iterable[SaveTensor]) -> dict[tuple[str, str], float]:
    """(output tensor, input model) → the ``weight`` mergekit resolved for that pair."""
    weights = {}
    for task in tasks:
        for model, parameters in task.tensor_task.input_parameters.items():
            if "weight" in parameters:
                weights[task.tensor_name, str(model)] = parameters["weight"]
    return weights


def check_planned_weights(
    variant: Variant,
    unscaled: Mapping[tuple[str, str], float],
    scaled_models: Iterable[str],
    options: MergeOptions,
) -> None:
    """Plan ``variant`` and check that mergekit resolves the intended weight everywhere:
    α × the recipe's weight on the scaled inputs of the variant's tensors, the recipe's
    weight elsewhere. A mismatch means a filter selected the wrong tensors."""
    scaled_models = set(scaled_models)
    for (tensor, model), weight in planned_weights(plan(variant.recipe, options)).items():
        original = unscaled[tensor, model]
        in_variant = variant.kind == ALL or module_kind(tensor) == variant.kind
        expected = original * variant.alpha if in_variant and model in scaled_models else original
        if not math.isclose(weight, expected, rel_tol=1e-9, abs_tol=1e-12):
            raise FttError(
                f"variant {variant.label}: mergekit would give {tensor} of {model} weight "
                f"{weight}, not {expected}; the recipe's filters select other tensors than "
                "intended. Please report this with the recipe."
            )


# --- reading the inputs once ------------------------------------------------------------


class CachingLoader:
    """A mergekit ``LazyTensorLoader`` that keeps each tensor it has read.

    It stands in for the loader mergekit made for one input model; ``reads`` counts the
    tensors read from disk.
    """

    def __init__(self, loader) -> None:
        self._loader = loader
        self.index = loader.index
        self.tensors: dict[str, torch.Tensor] = {}
        self.reads = 0

    def get_tensor(
        self,
        key: str,
        device: str = "cpu",
        aliases: list[str] | None = None,
        raise_on_missing: bool = True,
    ) -> torch.Tensor | None:
        names = [key, *(aliases or [])]
        name = next((n for n in names if n in self.index.tensor_paths), key)
        tensor = self.tensors.get(name)
        if tensor is None:
            tensor = self._loader.get_tensor(name, "cpu", raise_on_missing=raise_on_missing)
            if tensor is None:
                return None
            self.reads += 1
            self.tensors[name] = tensor
        return tensor.to(device)

    def flush(self) -> None:
        self._loader.flush()  # closes the open shard; the kept tensors stay

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@contextlib.contextmanager
def read_once(
    models: Iterable[ModelReference], options: MergeOptions
) -> Iterator[dict[ModelReference, CachingLoader]]:
    """While active, every mergekit merge in this process reads ``models`` through
    :class:`CachingLoader`: each input tensor comes from disk once."""
    from mergekit.io.tasks import LoaderCache

    cache = LoaderCache()
    cache.setup(options=options)
    saved = dict(cache.loaders)
    loaders = {model: CachingLoader(cache.get(model)) for model in models}
    cache.loaders.update(loaders)
    try:
        yield loaders
    finally:
        cache.loaders.clear()
        cache.loaders.update(saved)


def merged_tensors(
    recipe: MergeConfiguration, options: MergeOptions
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every output tensor of ``recipe``, as mergekit-yaml computes them
    (its executor, devices and output dtype), without writing anything."""
    from mergekit.common import dtype_from_name
    from mergekit.graph import Executor
    from mergekit.io.tasks import ReturnTensor

    saves = {task.tensor_task: task for task in plan(recipe, options)}
    # ReturnTensor built without validation (see plan); SaveTensor's own conversion below.
    targets = [
        ReturnTensor.model_construct(weight_info=save.tensor_task.output_weight, tensor_task=task)
        for task, save in saves.items()
    ]
    executor = Executor(
        targets,
        math_device=options.device,
        storage_device=options.device if options.low_cpu_memory else "cpu",
    )
    for target, tensor in executor.run(quiet=True):
        save = saves[target.tensor_task]
        if tensor is None:
            if not save.optional:
                raise RuntimeError(f"No value for required tensor {save.tensor_name}")
            continue
        if save.dtype:  # as SaveTensor.execute converts before writing
            tensor = tensor.to(dtype=dtype_from_name(save.dtype))
        yield save.tensor_name, tensor


# --- files and folders ---------------------------------------------------------------------


def write_model_files(recipe: MergeConfiguration, folder: Path, options: MergeOptions) -> None:
    """What ``mergekit-yaml`` writes for ``recipe`` besides the weights: the output config,
    the tokenizer, tag-along files, the model card and the generation config, through the
    same functions ``run_merge`` calls, on the configuration it runs (:func:`runnable`)."""
    from mergekit_ftt.mergekit_adapter import write_side_files
    from mergekit_ftt.outputs import finish_output

    recipe, _ = runnable(recipe, options)
    write_side_files(recipe, folder, options)
    finish_output(recipe, str(folder), options)


def write_variant(variant: Variant, folder: Path, options: MergeOptions, recipe_text: str) -> None:
    """The variant written by mergekit's ``run_merge``, as ``mergekit-yaml`` writes it."""
    from mergekit_ftt.mergekit_adapter import extend_all

    extend_all()  # run_merge checked and staged in interpreters without the .pth hook
    from mergekit.merge import run_merge

    run_merge(variant.recipe.model_copy(deep=True), str(folder), options, recipe_text)


# --- one model in memory for the whole sweep ---------------------------------------------


class InMemoryModel:
    """A transformers model and tokenizer made from :func:`write_model_files`' folder,
    as ``from_pretrained`` would make them from a written variant, whose weights are
    replaced by each variant's in turn.

    ``dtype`` is the evaluation dtype (``"auto"``: the recipe's); tensors are converted
    to it on copy, as ``from_pretrained(dtype=...)`` converts a checkpoint's.
    """

    def __init__(self, files: Path, device: str, dtype: str, trust_remote_code: bool) -> None:
        import torch
        import transformers
        from transformers.initialization import no_init_weights

        config = transformers.AutoConfig.from_pretrained(files, trust_remote_code=trust_remote_code)
        torch_dtype = config.dtype if dtype == "auto" else getattr(torch, dtype)
        with no_init_weights():  # every parameter is overwritten by each variant
            model = transformers.AutoModelForCausalLM.from_config(
                config, dtype=torch_dtype, trust_remote_code=trust_remote_code
            )
        model.tie_weights()
        if (files / "generation_config.json").exists():
            model.generation_config = transformers.GenerationConfig.from_pretrained(files)
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            files, trust_remote_code=trust_remote_code
        )
        self._parameters = dict(self.model.state_dict())

    def load(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy a variant's tensors in; every parameter must be set (tied ones by their twin)."""
        import torch

        missing = {name for name, p in self._parameters.items() if isinstance(p, torch.Tensor)}
        with torch.no_grad():
            for name, tensor in tensors:
                parameter = self._parameters.get(name)
                if parameter is None:
                    raise FttError(
                        f"the merged tensor {name} has no counterpart in "
                        f"{type(self.model).__name__}; evaluate from disk with --build disk"
                    )
                parameter.copy_(tensor)
                missing.discard(name)
        tied = set(getattr(self.model, "_tied_weights_keys", None) or ())
        untouched = sorted(n for n in missing if n not in tied and not self._is_shared(n, missing))
        if untouched:
            raise FttError(
                f"the merge did not produce {', '.join(untouched[:5])}; evaluate from disk "
                "with --build disk"
            )

    def _is_shared(self, name: str, missing: set[str]) -> bool:
        """A parameter that shares storage with one that was set (tied embeddings)."""
        pointer = self._parameters[name].data_ptr()
        return any(
            other not in missing and p.data_ptr() == pointer
            for other, p in self._parameters.items()
        )


# --- memory ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    """How the sweep builds its variants, and why."""

    in_memory: bool  # build each variant in memory (else: write it, evaluate, delete)
    cache_inputs: bool  # keep the inputs in memory (read once per sweep)
    input_bytes: int
    model_bytes: int
    available_bytes: int

    def describe(self) -> str:
        sizes = (
            f"inputs {_gb(self.input_bytes)}, model {_gb(self.model_bytes)}, "
            f"{_gb(self.available_bytes)} available"
        )
        if self.in_memory:
            return f"variants built in memory, inputs read once ({sizes})"
        reads = "inputs read once" if self.cache_inputs else "inputs read again per variant"
        return f"variants written to disk one at a time, {reads} ({sizes})"


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.2f} MB"


# Headroom for activations, lm-eval and the interpreter itself.
MEMORY_SHARE = 0.8


def checkpoint_bytes(model: ModelReference, options: MergeOptions) -> int:
    """The bytes of ``model``'s weight files, through the loader mergekit reads it with
    (for a ``role: delta`` folder, the adapter's delta loader: its stored files)."""
    index = model.lazy_loader(cache_dir=options.transformers_cache).index
    return sum(
        os.path.getsize(Path(index.base_path) / shard) for shard in set(index.tensor_paths.values())
    )


def memory_plan(
    recipe: MergeConfiguration,
    options: MergeOptions,
    build: str,
    backend: str,
    eval_device: str,
    eval_element_bytes: int,
) -> MemoryPlan:
    """``build``: ``memory``, ``disk``, or ``auto`` (memory when the hf backend can have
    the inputs and the model in RAM, disk otherwise)."""
    import psutil

    models = recipe.referenced_models()
    input_bytes = sum(checkpoint_bytes(m, options) for m in models)
    target = checkpoint_bytes(recipe.base_model, options)
    stored = _element_bytes(recipe.base_model, options)
    model_bytes = target * eval_element_bytes // stored
    host_model = model_bytes if eval_device == "cpu" else 0
    budget = int(psutil.virtual_memory().available * MEMORY_SHARE)
    if build == "memory" and backend != "hf":
        raise FttError("--build memory needs --backend hf (lm-eval's vLLM loads from a folder)")
    in_memory = build == "memory" or (
        build == "auto" and backend == "hf" and input_bytes + host_model <= budget
    )
    cache = in_memory or input_bytes <= budget
    return MemoryPlan(in_memory, cache, input_bytes, model_bytes, budget)


def _element_bytes(model: ModelReference, options: MergeOptions) -> int:
    import torch

    dtype = getattr(model.config(trust_remote_code=options.trust_remote_code), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 4
