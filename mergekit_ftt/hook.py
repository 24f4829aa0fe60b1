"""Make ``finetuning_transfer`` known to an unmodified mergekit.

mergekit 0.1.5 has no plugin entry points: its method registry is filled when
``mergekit.merge_methods`` is imported. The installed ``mergekit_ftt_hook.pth`` calls
:func:`install` at interpreter start; it puts a finder on ``sys.meta_path`` that waits
for two mergekit modules and extends each right after it has run:

- ``mergekit.merge_methods``: register ``finetuning_transfer`` in the registry;
- ``mergekit.merge``: wrap ``run_merge`` so that a ``finetuning_transfer`` merge runs
  with the plugin's defaults for the options the user left
  (:mod:`mergekit_ftt.merge_options`), is checked (:mod:`mergekit_ftt.preflight`) before
  anything is loaded or written, reads its inputs ahead (:mod:`mergekit_ftt.readahead`),
  and its output gets the generation config that goes with its tokenizer
  (:mod:`mergekit_ftt.outputs`). The entry points (``mergekit-yaml``,
  ``mergekit-multi``) import ``run_merge`` from there.

Until then nothing is imported, so interpreters that never touch mergekit pay only for
this stdlib-only module, and a missing mergekit breaks nothing.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType


def register() -> None:
    """Register ``finetuning_transfer`` with mergekit's registry, once.

    Safe to call any number of times; mergekit itself raises on a duplicate name.
    """
    from mergekit.merge_methods import registry

    from mergekit_ftt import METHOD_NAME
    from mergekit_ftt.merge_methods.finetuning_transfer import finetuning_transfer

    if all(method.spec.name != METHOD_NAME for method in registry.registered_methods()):
        registry.register(finetuning_transfer)


def _check_before_run_merge(merge_module: ModuleType) -> None:
    run_merge = merge_module.run_merge
    if getattr(run_merge, "_ftt_checked", False):
        return

    @functools.wraps(run_merge)
    def checked_run_merge(merge_config, out_path, options, *args, **kwargs):
        from mergekit_ftt.merge_options import transfer_options
        from mergekit_ftt.outputs import copy_generation_config
        from mergekit_ftt.preflight import check_merge
        from mergekit_ftt.readahead import reading_ahead

        options = transfer_options(merge_config, options)
        merge_config = check_merge(merge_config, out_path, options)
        with reading_ahead(merge_config):
            result = run_merge(merge_config, out_path, options, *args, **kwargs)
        copy_generation_config(merge_config, out_path, options)
        return result

    checked_run_merge._ftt_checked = True
    merge_module.run_merge = checked_run_merge


_AFTER_IMPORT: dict[str, Callable[[ModuleType], None]] = {
    "mergekit.merge_methods": lambda _module: register(),
    "mergekit.merge": _check_before_run_merge,
}


class _ExtendAfterExec(importlib.abc.Loader):
    """Runs a module's real loader, then its entry in ``_AFTER_IMPORT``."""

    def __init__(self, loader: importlib.abc.Loader, extend: Callable[[ModuleType], None]):
        self._loader = loader
        self._extend = extend

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._extend(module)


class _MergekitFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        extend = _AFTER_IMPORT.get(fullname)
        if extend is None:
            return None
        # Find the real spec with the other finders, then wrap its loader.
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _ExtendAfterExec(spec.loader, extend)
        return spec


def install() -> None:
    """Extend mergekit now if it is imported, else when it is (idempotent; never raises)."""
    try:
        for name, extend in _AFTER_IMPORT.items():
            if name in sys.modules:
                extend(sys.modules[name])
        if not any(isinstance(finder, _MergekitFinder) for finder in sys.meta_path):
            sys.meta_path.insert(0, _MergekitFinder())
    except Exception as error:  # a broken plugin must never break the interpreter
        print(f"mergekit-ftt: start-up hook disabled: {error!r}", file=sys.stderr)
