"""The variants' weights, from one read of the inputs, through mergekit's own plan.

:class:`SweepPlan` checks the recipe with the merge's preflight once and has each variant
planned by mergekit's ``MergePlanner`` once (through :mod:`mergekit_ftt.mergekit_adapter`),
so each output tensor comes out of the same ``finetuning_transfer`` kernel that
``mergekit-yaml`` runs on that variant's recipe, bit for bit. What changes is where the
inputs come from and where the outputs go:

- :func:`read_once` puts a caching loader in front of each input in mergekit's
  ``LoaderCache``: the first variant reads a tensor from disk, every later variant gets
  the same tensor from memory, so the checkpoints are read once per sweep.
- :class:`InMemoryModel`: one transformers model for the whole sweep; each variant's
  tensors (:meth:`SweepPlan.tensors`) are copied into it as mergekit's executor yields
  them, and lm-eval's hf backend gets the model object. No variant is written to disk.
- :meth:`SweepPlan.write`: mergekit's ``run_merge`` writes a variant to a folder, for vLLM
  or a model that does not fit in memory; the caller deletes it after evaluation.
- :meth:`SweepPlan.write_model_files`: what ``mergekit-yaml`` writes besides the weights
  (config, tokenizer, generation config), once per sweep, for the in-memory model.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator
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

    from mergekit_ftt.mergekit_adapter import MergePlan


def merge_options(trust_remote_code: bool = False) -> MergeOptions:
    """mergekit-yaml's defaults, quiet (the sweep draws its own progress)."""
    from mergekit.options import MergeOptions

    return MergeOptions(quiet=True, trust_remote_code=trust_remote_code)


class SweepPlan:
    """The recipe checked by the merge's preflight once and planned by mergekit
    (:class:`mergekit_ftt.mergekit_adapter.MergePlan`), and each variant's plan, made once
    from it: variants differ only in weights, so the preflight (which reads every
    checkpoint's headers) runs once per sweep, and a variant planned to check its weights
    is the plan that later builds it, in memory or on disk."""

    def __init__(self, recipe: MergeConfiguration, options: MergeOptions) -> None:
        from mergekit_ftt.mergekit_adapter import plan_merge

        self.base = plan_merge(recipe, options)
        self._variants: dict[str, MergePlan] = {}

    @property
    def note(self) -> str | None:
        """The preflight's note on the merge's precision, to be shown once."""
        return self.base.note

    def variant(self, variant: Variant) -> MergePlan:
        if variant.label not in self._variants:
            self._variants[variant.label] = self.base.with_weights(variant.recipe)
        return self._variants[variant.label]

    def check_weights(self, variant: Variant, scaled_models: Iterable[str]) -> None:
        """Check that mergekit resolves the intended weight everywhere in ``variant``: α ×
        the recipe's weight on the scaled inputs of the variant's tensors, the recipe's
        weight elsewhere. A mismatch means a filter selected the wrong tensors."""
        unscaled = planned_weights(self.base.save_tasks)
        scaled_models = set(scaled_models)
        for (tensor, model), weight in planned_weights(self.variant(variant).save_tasks).items():
            original = unscaled[tensor, model]
            in_variant = variant.kind == ALL or module_kind(tensor) == variant.kind
            scaled = in_variant and model in scaled_models
            expected = original * variant.alpha if scaled else original
            if not math.isclose(weight, expected, rel_tol=1e-9, abs_tol=1e-12):
                raise FttError(
                    f"variant {variant.label}: mergekit would give {tensor} of {model} weight "
                    f"{weight}, not {expected}; the recipe's filters select other tensors "
                    "than intended. Please report this with the recipe."
                )

    def tensors(self, variant: Variant) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of every output tensor of ``variant``, as mergekit-yaml computes
        them, without writing anything."""
        return self.variant(variant).tensors()

    def write(self, variant: Variant, folder: Path, recipe_text: str) -> None:
        """The variant written by mergekit's ``run_merge`` as ``mergekit-yaml`` writes it
        (staged, with the transfer's side files); the caller deletes it after evaluation."""
        self.variant(variant).write(folder, recipe_text)

    def write_model_files(self, folder: Path) -> None:
        """What ``mergekit-yaml`` writes besides the weights: the output config, the
        tokenizer, tag-along files, the model card and the generation config, through the
        same functions ``run_merge`` calls, on the configuration it runs."""
        from mergekit_ftt.mergekit_adapter import write_side_files
        from mergekit_ftt.outputs import finish_output

        write_side_files(self.base.config, folder, self.base.options)
        finish_output(self.base.config, str(folder), self.base.options)


def planned_weights(tasks: Iterable[SaveTensor]) -> dict[tuple[str, str], float]:
    """(output tensor, input model) → the ``weight`` mergekit resolved for that pair."""
    weights = {}
    for task in tasks:
        for model, parameters in task.tensor_task.input_parameters.items():
            if "weight" in parameters:
                weights[task.tensor_name, str(model)] = parameters["weight"]
    return weights


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


def read_once(
    models: Iterable[ModelReference], options: MergeOptions
) -> contextlib.AbstractContextManager[dict[ModelReference, CachingLoader]]:
    """While active, every mergekit merge in this thread reads ``models`` through
    :class:`CachingLoader`: each input tensor comes from disk once."""
    from mergekit_ftt.mergekit_adapter import loaders_wrapped

    return loaders_wrapped(models, options, CachingLoader)


# --- one model in memory for the whole sweep ---------------------------------------------


class InMemoryModel:
    """A transformers model and tokenizer made from :meth:`SweepPlan.write_model_files`' folder,
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
