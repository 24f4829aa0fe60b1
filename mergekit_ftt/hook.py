"""Make ``finetuning_transfer`` known to an unmodified mergekit.

mergekit 0.1.5 has no plugin entry points: its method registry is filled when
``mergekit.merge_methods`` is imported. The installed ``mergekit_ftt_hook.pth`` calls
:func:`install` at interpreter start; it puts a finder on ``sys.meta_path`` that waits
for ``mergekit.merge_methods`` to be imported and registers our method right after the
module has run. Until then nothing is imported, so interpreters that never touch
mergekit pay only for this stdlib-only module, and a missing mergekit breaks nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

_WATCHED = "mergekit.merge_methods"


def register() -> None:
    """Register ``finetuning_transfer`` with mergekit's registry, once.

    Safe to call any number of times; mergekit itself raises on a duplicate name.
    """
    from mergekit.merge_methods import registry

    from mergekit_ftt import METHOD_NAME
    from mergekit_ftt.merge_methods.finetuning_transfer import finetuning_transfer

    if all(method.spec.name != METHOD_NAME for method in registry.registered_methods()):
        registry.register(finetuning_transfer)


class _RegisterAfterExec(importlib.abc.Loader):
    """Runs the real loader of ``mergekit.merge_methods``, then :func:`register`."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        register()


class _MergeMethodsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != _WATCHED:
            return None
        # Find the real spec with the other finders, then wrap its loader.
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisterAfterExec(spec.loader)
        return spec


def install() -> None:
    """Put the finder on ``sys.meta_path`` (idempotent; never raises)."""
    try:
        if _WATCHED in sys.modules:  # imported before us: register now
            register()
        elif not any(isinstance(f, _MergeMethodsFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _MergeMethodsFinder())
    except Exception as error:  # a broken plugin must never break the interpreter
        print(f"mergekit-ftt: start-up hook disabled: {error!r}", file=sys.stderr)
