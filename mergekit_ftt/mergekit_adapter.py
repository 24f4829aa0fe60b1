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
  output only once complete (:mod:`mergekit_ftt.outputs`), and adds the side files (model
  card, generation config). Every other merge passes through with its arguments
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
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from mergekit_ftt import METHOD_NAME

if TYPE_CHECKING:
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import SaveTensor
    from mergekit.options import MergeOptions

SUPPORTED_MERGEKIT = "mergekit==0.1.5"
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
    from mergekit_ftt.outputs import StagedOutput, finish_output, holds_finished_merge

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
    with StagedOutput(out_path) as staging:
        bound.arguments["out_path"] = str(staging)
        result = run_merge(*bound.args, **bound.kwargs)
        finish_output(config, str(staging), options, name=Path(out_path).name)
    return result


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
    EXTENSIONS[module_name](module)


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
