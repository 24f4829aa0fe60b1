"""Every place mergekit-ftt reaches into mergekit beyond its public API, and nothing else.

mergekit 0.1.5 has no plugin entry points, so three of its modules are extended right
after they are imported (the start-up hook, :mod:`mergekit_ftt.hook`, calls
:func:`extend` for each), and :func:`rollback` undoes all three if any step fails:

- ``mergekit.merge_methods``: ``finetuning_transfer`` joins the method registry.
- ``mergekit.common``: ``ModelReference.lazy_loader`` also opens delta folders (the inputs
  of ``role: delta``) with :class:`mergekit_ftt.delta.loader.DeltaTensorLoader`. mergekit
  reads every input through that method and has no hook for other formats.
- ``mergekit.merge``: ``run_merge`` is wrapped (:func:`_checked_run_merge`). For a
  ``finetuning_transfer`` recipe it checks the inputs before anything is loaded
  (:mod:`mergekit_ftt.preflight`), fills in the transfer's defaults for options the user
  left (:mod:`mergekit_ftt.merge_options`), writes into a staging folder that becomes the
  output only once complete (:mod:`mergekit_ftt.outputs`), bounds the shards that
  ``--async-write`` holds in memory (``mergekit.io.tensor_writer``'s queue, for the run's
  duration: :func:`_bounded_writes`), and adds the side files (model card, generation
  config). Every other merge passes through with its arguments
  untouched; the one thing it is refused is a delta folder as input, which only this
  plugin's loader can read.

``ftt-inspect`` and ``ftt-sweep`` plan merges with mergekit's own planner
(:func:`plan_save_tasks`) and write the files ``run_merge`` writes beside the weights
(:func:`write_side_files`), through the private helpers of ``mergekit.merge`` that
``run_merge`` itself uses: the adapter is the only module that imports them.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from mergekit_ftt import METHOD_NAME

if TYPE_CHECKING:
    import torch
    from mergekit.common import ModelReference
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import SaveTensor
    from mergekit.options import MergeOptions

SUPPORTED_VERSION = "0.1.5"
SUPPORTED_MERGEKIT = f"mergekit=={SUPPORTED_VERSION}"
# The attribute that marks what the adapter installed, so that each step runs once and
# rollback finds the original.
_MARK = "_mergekit_ftt_original"


def register() -> None:
    """Put ``finetuning_transfer`` in mergekit's registry, once (mergekit raises on a
    duplicate name)."""
    from mergekit.merge_methods import registry

    from mergekit_ftt.merge_methods.finetuning_transfer import finetuning_transfer

    if all(method.spec.name != METHOD_NAME for method in registry.registered_methods()):
        registry.register(finetuning_transfer)


def _unregister() -> None:
    # mergekit has no public way to unregister: its registry is the private _METHODS dict.
    registry = sys.modules.get("mergekit.merge_methods.registry")
    methods = getattr(registry, "_METHODS", None)
    if isinstance(methods, dict):
        methods.pop(METHOD_NAME, None)


def _read_delta_folders(common: ModuleType) -> None:
    """Wrap ``ModelReference.lazy_loader`` so that a delta folder loads decoded."""
    reference_class = common.ModelReference
    original = reference_class.lazy_loader
    if hasattr(original, _MARK):
        return
    from mergekit_ftt.delta.loader import delta_loader

    @functools.wraps(original)
    def lazy_loader(self, cache_dir=None, lazy_unpickle=True):
        loader = delta_loader(self, self.local_path(cache_dir))
        if loader is not None:
            return loader
        return original(self, cache_dir=cache_dir, lazy_unpickle=lazy_unpickle)

    setattr(lazy_loader, _MARK, original)
    reference_class.lazy_loader = lazy_loader


def _restore_lazy_loader() -> None:
    common = sys.modules.get("mergekit.common")
    reference_class = getattr(common, "ModelReference", None)
    original = getattr(getattr(reference_class, "lazy_loader", None), _MARK, None)
    if original is not None:
        reference_class.lazy_loader = original


def _check_run_merge(merge: ModuleType) -> None:
    """Wrap ``mergekit.merge.run_merge`` (see the module's docstring)."""
    run_merge = merge.run_merge
    if hasattr(run_merge, _MARK):
        return
    import inspect

    signature = inspect.signature(run_merge)
    missing = {"merge_config", "out_path", "options"} - set(signature.parameters)
    if missing:
        raise TypeError(f"run_merge has no parameter {', '.join(sorted(missing))}")

    @functools.wraps(run_merge)
    def checked_run_merge(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return run_merge(*args, **kwargs)  # mergekit reports the wrong call itself
        return _checked_run_merge(run_merge, bound)

    setattr(checked_run_merge, _MARK, run_merge)
    merge.run_merge = checked_run_merge


def _checked_run_merge(run_merge, bound):
    from mergekit_ftt.preflight import check_merge, referenced_models, refuse_in_other_methods

    config = bound.arguments["merge_config"]
    if getattr(config, "merge_method", None) != METHOD_NAME:
        refuse_in_other_methods(referenced_models(config))
        return run_merge(*bound.args, **bound.kwargs)

    from mergekit_ftt.merge_options import transfer_options
    from mergekit_ftt.outputs import holds_finished_merge

    out_path = str(bound.arguments["out_path"])
    # What mergekit writes as mergekit_config.yml: the recipe as the user gave it.
    recipe_text = bound.arguments.get("config_source") or config.to_yaml()
    bound.arguments["config_source"] = recipe_text
    if holds_finished_merge(out_path, recipe_text):
        print(
            f"mergekit-ftt: {out_path} is complete: it holds this recipe's finished merge "
            "(its mergekit_config.yml matches); nothing to do. Delete the folder to merge "
            "again.",
            file=sys.stderr,
        )
        return None
    options = bound.arguments["options"] = transfer_options(config, bound.arguments["options"])
    config = bound.arguments["merge_config"] = check_merge(config, out_path, options)

    def run_merge_into(staging: str):
        bound.arguments["out_path"] = staging
        return run_merge(*bound.args, **bound.kwargs)

    return _write_staged(run_merge_into, config, out_path, options)


def _write_staged(run_merge_into, config: MergeConfiguration, out_path: str, options):
    """``run_merge_into(folder)`` writes a checked transfer into a staging folder that
    becomes ``out_path`` once complete, with the transfer's side files."""
    from mergekit_ftt.outputs import StagedOutput, finish_output

    with StagedOutput(out_path) as staging, _bounded_writes():
        result = run_merge_into(str(staging))
        finish_output(config, str(staging), options, name=Path(out_path).name)
    return result


@contextlib.contextmanager
def _bounded_writes() -> Iterator[None]:
    """While a transfer runs, ``--async-write`` keeps at most ``--write-threads`` shards
    in flight: before handing a full shard to its writer threads, mergekit's writer waits
    for the oldest write beyond that.

    mergekit queues every full shard without a bound. A disk slower than the merge (a
    warm page cache, a network file system) would then hold most of the model in memory,
    and a failed write (a full disk) would only be raised at the end, after every
    remaining shard had been merged and queued. Waiting here keeps memory to the writing
    shards and the one filling, and raises a failed write's error at the next shard.
    """
    from mergekit.io.tensor_writer import TensorWriter

    flush = TensorWriter._flush_current_shard

    def flush_when_a_writer_is_free(self) -> None:
        if self.use_async and self.current_shard:
            pending = [future for future in self._write_futures if not future.done()]
            # (ThreadPoolExecutor keeps its thread count in _max_workers; the writer
            # does not keep write_threads itself.)
            for future in pending[: max(0, len(pending) - self._executor._max_workers + 1)]:
                future.exception()  # waits for it to finish
            for future in self._write_futures:
                if future.done():
                    future.result()  # a failed write's error, now
        flush(self)

    TensorWriter._flush_current_shard = flush_when_a_writer_is_free
    try:
        yield
    finally:
        TensorWriter._flush_current_shard = flush


def _restore_run_merge() -> None:
    merge = sys.modules.get("mergekit.merge")
    original = getattr(getattr(merge, "run_merge", None), _MARK, None)
    if original is not None:
        merge.run_merge = original


# The mergekit modules the start-up hook waits for, and what the adapter does to each.
EXTENSIONS = {
    "mergekit.common": _read_delta_folders,
    "mergekit.merge_methods": lambda _module: register(),
    "mergekit.merge": _check_run_merge,
}


def extend(module_name: str, module: ModuleType) -> None:
    """Extend one mergekit module; each extension is applied once, however often asked."""
    _check_version()
    EXTENSIONS[module_name](module)


def installed_mergekit() -> str | None:
    """The installed mergekit's version (mergekit 0.1.5 has no ``__version__``)."""
    from importlib import metadata

    try:
        return metadata.version("mergekit")
    except metadata.PackageNotFoundError:
        return None


_version_checked = False


def _check_version() -> None:
    """One warning per process when mergekit is not the release the extensions were
    written against. They still run: each rests on a symbol that a step failing to find
    makes the hook roll every extension back (:func:`rollback`)."""
    global _version_checked
    if _version_checked:
        return
    _version_checked = True
    found = installed_mergekit()
    if found is not None and found != SUPPORTED_VERSION:
        print(
            f"mergekit-ftt: warning: mergekit {found} is installed; mergekit-ftt extends the "
            f"internals of {SUPPORTED_MERGEKIT}, which another release may change. If a "
            f"finetuning_transfer merge fails, install {SUPPORTED_MERGEKIT}.",
            file=sys.stderr,
        )


def extend_all() -> None:
    """Import and extend every module now: for interpreters where the ``.pth`` start-up
    hook did not run (a ``--target`` install, ``python -S``)."""
    import importlib

    for module_name in EXTENSIONS:
        extend(module_name, importlib.import_module(module_name))


def rollback() -> None:
    """Undo every extension, so that mergekit runs as if the plugin were not installed.

    A method without its run_merge checks would skip the preflight (dtype policy,
    overwrite protection), and delta folders without the method are of no use: all three
    go together. Each step is best effort; none may raise.
    """
    for undo in (_unregister, _restore_lazy_loader, _restore_run_merge):
        with contextlib.suppress(Exception):  # a clean-up must never break mergekit
            undo()


# --- planning and side files, for ftt-inspect and ftt-sweep ------------------------------


def plan_save_tasks(config: MergeConfiguration, options: MergeOptions) -> list[SaveTensor]:
    """mergekit's plan of ``config`` as ``run_merge`` builds it: one ``SaveTensor`` per
    output tensor; no task is executed, so nothing is read or written.

    mergekit 0.1.5's ``plan_in_memory`` cannot be used: its ``ReturnTensor`` validates the
    merge task as a ``Task[Tensor]`` and fails on ``ExecuteMergeMethodTask``. The planner
    rewrites the configuration it is given (``models`` into ``modules``): it gets a copy.
    """
    from mergekit.architecture import get_architecture_info
    from mergekit.io.tasks import LoaderCache, SaveTensor
    from mergekit.plan import MergePlanner

    extend_all()  # the method registered in interpreters without the .pth hook
    LoaderCache().setup(options=options)
    arch_info = get_architecture_info(config, options)
    out_config = _out_config(config, arch_info, options)
    planner = MergePlanner(config.model_copy(deep=True), arch_info, options, out_config)
    tasks = planner.plan_to_disk(out_path="unused: the writer task is never run")
    return [task for task in tasks if isinstance(task, SaveTensor)]


@dataclass(frozen=True)
class MergePlan:
    """A ``finetuning_transfer`` recipe checked by the preflight once and planned by
    mergekit: what ``mergekit-yaml`` would run, ready to compute in memory or to write.

    ``config`` is the configuration the merge runs (the preflight's precision and paths),
    ``note`` the preflight's note on that precision (None when it is the recipe's).
    :meth:`with_weights` plans a variant that differs only in its models' parameters (a
    sweep's α) without checking the inputs again.
    """

    recipe: MergeConfiguration
    config: MergeConfiguration
    options: MergeOptions
    note: str | None
    save_tasks: tuple[SaveTensor, ...]

    def with_weights(self, recipe: MergeConfiguration) -> MergePlan:
        """The plan of ``recipe``, this plan's recipe with other model parameters: the
        preflight's result is reused (it changes only merge-wide settings and model paths,
        never a model's parameters), mergekit resolves the new parameters per tensor."""
        if _without_model_parameters(recipe) != _without_model_parameters(self.recipe):
            raise ValueError("with_weights: the recipes differ in more than model parameters")
        models = [
            checked.model_copy(update={"parameters": model.parameters})
            for checked, model in zip(self.config.models or [], recipe.models or [], strict=True)
        ]
        config = self.config.model_copy(update={"models": models or self.config.models})
        tasks = tuple(plan_save_tasks(config, self.options))
        return MergePlan(recipe, config, self.options, self.note, tasks)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of every output tensor, as ``run_merge`` computes them (its
        executor, devices and output dtype), without writing anything."""
        from mergekit.common import dtype_from_name
        from mergekit.graph import Executor
        from mergekit.io.tasks import ReturnTensor

        saves = {task.tensor_task: task for task in self.save_tasks}
        # Built without validation: mergekit 0.1.5's ReturnTensor rejects its own merge
        # task (see plan_save_tasks). SaveTensor's dtype conversion is applied below.
        targets = [
            ReturnTensor.model_construct(weight_info=save.tensor_task.output_weight, tensor_task=t)
            for t, save in saves.items()
        ]
        options = self.options
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

    def write(self, out_path: str | Path, config_source: str) -> None:
        """Write the merge as ``mergekit-yaml`` does (mergekit's own ``run_merge``, staged,
        with the transfer's side files), without checking the inputs again."""
        from mergekit import merge

        run_merge = getattr(merge.run_merge, _MARK, merge.run_merge)  # mergekit's own

        def run_merge_into(staging: str) -> None:
            run_merge(self.config.model_copy(deep=True), staging, self.options, config_source)

        _write_staged(run_merge_into, self.config, str(out_path), self.options)


def plan_merge(recipe: MergeConfiguration, options: MergeOptions) -> MergePlan:
    """Check ``recipe`` with the merge's preflight and plan it (see :class:`MergePlan`)."""
    from mergekit_ftt.preflight import runnable_config

    config, note = runnable_config(recipe, options)
    return MergePlan(recipe, config, options, note, tuple(plan_save_tasks(config, options)))


def _without_model_parameters(recipe: MergeConfiguration) -> str:
    models = [model.model_copy(update={"parameters": None}) for model in recipe.models or []]
    return recipe.model_copy(update={"models": models or recipe.models}).to_yaml()


@contextlib.contextmanager
def loaders_wrapped(
    models: Iterable[ModelReference], options: MergeOptions, wrap: Callable[[object], object]
) -> Iterator[dict[ModelReference, object]]:
    """While active, mergekit reads each of ``models`` in this thread through
    ``wrap(its loader)``; the wrapped loaders are the context's value.

    mergekit has no public way to put a loader in front of its own: ``LoaderCache`` (one
    per thread) keeps them in its ``loaders`` dict, which is set here and restored after.
    """
    from mergekit.io.tasks import LoaderCache

    cache = LoaderCache()
    cache.setup(options=options)
    saved = dict(cache.loaders)
    wrapped = {model: wrap(cache.get(model)) for model in models}
    cache.loaders.update(wrapped)
    try:
        yield wrapped
    finally:
        cache.loaders.clear()
        cache.loaders.update(saved)


def _out_config(config, arch_info, options):
    # mergekit builds the output's config.json with this private helper of run_merge.
    from mergekit.merge import _model_out_config

    return _model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)


def write_side_files(config: MergeConfiguration, folder: Path, options: MergeOptions) -> None:
    """What ``run_merge`` writes besides the weights and the model card: the output
    config (layer count, vocabulary size, dtype), the tokenizer and tag-along files,
    through the private helpers of ``mergekit.merge`` that ``run_merge`` calls."""
    from mergekit import merge
    from mergekit.architecture import get_architecture_info
    from mergekit.tokenizer import BuildTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    arch_info = get_architecture_info(config, options)
    out_config = _out_config(config, arch_info, options)
    source = config.tokenizer.source if config.tokenizer else config.tokenizer_source
    if source is not None:  # as MergePlanner builds it, and run_merge saves it
        tokens = (config.tokenizer.tokens if config.tokenizer else None) or {}
        tokenizer = (
            BuildTokenizer(
                base_model=config.base_model,
                referenced_models=tuple(config.referenced_models()),
                tokenizer_source=source,
                trust_remote_code=options.trust_remote_code,
                add_tokens=tuple(tokens),
            )
            .execute()
            .tokenizer
        )
        pad = config.tokenizer.pad_to_multiple_of if config.tokenizer else None
        merge._update_config_vocab(out_config, arch_info, tokenizer, pad_to_multiple_of=pad)
        out_config.save_pretrained(folder)
        merge._set_chat_template(tokenizer, config)
        tokenizer.save_pretrained(folder, safe_serialization=True)
    else:
        out_config.save_pretrained(folder)
        if options.copy_tokenizer:
            merge._copy_tokenizer(config, str(folder), options=options)
    merge._copy_tagalong_files(
        config, str(folder), files=arch_info.tagalong_files or [], options=options
    )
