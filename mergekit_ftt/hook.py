"""Make ``finetuning_transfer`` known to an unmodified mergekit: the start-up hook.

mergekit 0.1.5 has no plugin entry points: its method registry is filled when
``mergekit.merge_methods`` is imported. The installed ``mergekit_ftt_hook.pth`` calls
:func:`install` at interpreter start; it puts a finder on ``sys.meta_path`` that waits for
the mergekit modules the adapter extends (:data:`EXTENDED`) and hands each to
:func:`mergekit_ftt.mergekit_adapter.extend` right after it has run. What is extended, and
why, is the adapter's business (:mod:`mergekit_ftt.mergekit_adapter`); this module only
decides when.

The ``.pth`` line runs in every interpreter of the environment, so this module imports
nothing but ``sys`` (no ``importlib.abc``, ``functools`` or ``typing``: they pull in
``pathlib``, ``tempfile`` and more); the finder and loader are duck-typed. If extending
mergekit fails (a later mergekit moved a symbol), the adapter undoes every extension, the
plugin switches itself off with one warning, and mergekit runs as if it were not
installed.
"""

import sys

# The modules mergekit_ftt.mergekit_adapter.EXTENSIONS extends, in import order.
EXTENDED = ("mergekit.common", "mergekit.merge_methods", "mergekit.merge")

_disabled = False


def _disable(module_name: str, error: BaseException) -> None:
    """Switch the plugin off for this process with one warning; mergekit keeps working."""
    global _disabled
    if _disabled:
        return
    _disabled = True
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _MergekitFinder)]
    from mergekit_ftt.mergekit_adapter import SUPPORTED_MERGEKIT, installed_mergekit, rollback

    rollback()  # never raises
    version = installed_mergekit() or ""
    kind = type(error).__name__
    print(
        f"mergekit-ftt: warning: could not extend {module_name} ({kind}: "
        f"{error}); finetuning_transfer is unavailable and mergekit{' ' + version if version else ''}"
        f" runs without it. mergekit-ftt supports {SUPPORTED_MERGEKIT}.",
        file=sys.stderr,
    )


def _extend(module_name: str, module) -> None:
    if _disabled:
        return
    try:
        from mergekit_ftt.mergekit_adapter import extend

        extend(module_name, module)
    except Exception as error:  # a broken plugin must never break mergekit
        _disable(module_name, error)


class _ExtendAfterExec:
    """Runs a module's real loader, then extends the module.

    Everything else (``get_resource_reader``, ``get_filename``, ``is_package`` …) is the
    real loader's, so ``importlib.resources`` and friends see no difference.
    """

    def __init__(self, loader) -> None:
        self._loader = loader

    def __getattr__(self, name: str):
        if name == "_loader":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _extend(module.__name__, module)


class _MergekitFinder:
    """A ``sys.meta_path`` finder that answers only for the modules in :data:`EXTENDED`.

    It asks the finders after it for the real spec and wraps that spec's loader. It stays
    on ``sys.meta_path`` (a later import of another extended module still needs it) until
    the plugin is switched off (:func:`_disable`).
    """

    def __init__(self) -> None:
        self._finding: set[str] = set()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in EXTENDED or fullname in self._finding or _disabled:
            return None
        self._finding.add(fullname)  # a finder below may ask the import system again
        try:
            spec = self._find_below(fullname, path, target)
        finally:
            self._finding.discard(fullname)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _ExtendAfterExec(spec.loader)
        return spec

    def _find_below(self, fullname, path, target):
        meta_path = sys.meta_path
        below = meta_path[meta_path.index(self) + 1 :] if self in meta_path else meta_path
        for finder in below:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                return spec
        return None


def install() -> None:
    """Extend mergekit now if it is imported, else when it is (idempotent; never raises)."""
    try:
        for name in EXTENDED:
            if name in sys.modules:
                _extend(name, sys.modules[name])
        if not _disabled and not any(isinstance(f, _MergekitFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _MergekitFinder())
    except Exception as error:  # a broken plugin must never break the interpreter
        print(f"mergekit-ftt: warning: start-up hook disabled: {error!r}", file=sys.stderr)
