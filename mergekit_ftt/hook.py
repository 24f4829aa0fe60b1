"""Make ``finetuning_transfer`` known to an unmodified mergekit.

mergekit 0.1.5 has no plugin entry points: its method registry is filled when
``mergekit.merge_methods`` is imported. The installed ``mergekit_ftt_hook.pth`` calls
:func:`install` at interpreter start; it puts a finder on ``sys.meta_path`` that waits
for three mergekit modules and extends each right after it has run:

- ``mergekit.merge_methods``: register ``finetuning_transfer`` in the registry;
- ``mergekit.common``: let mergekit's tensor loader read delta folders
  (:mod:`mergekit_ftt.delta.loader`), the inputs of ``role: delta``;
- ``mergekit.merge``: wrap ``run_merge`` so that a ``finetuning_transfer`` merge runs
  with the plugin's defaults for the options the user left
  (:mod:`mergekit_ftt.merge_options`), is checked (:mod:`mergekit_ftt.preflight`) before
  anything is loaded or written, and its output gets the generation config that goes
  with its tokenizer
  (:mod:`mergekit_ftt.outputs`). The entry points (``mergekit-yaml``,
  ``mergekit-multi``) import ``run_merge`` from there.

The ``.pth`` line runs in every interpreter of the environment, so this module imports
nothing but ``sys`` (no ``importlib.abc``, ``functools`` or ``typing``: they pull in
``pathlib``, ``tempfile`` and more); the finder and loader are duck-typed. If extending
mergekit fails (a later mergekit moved a symbol), the plugin switches itself off with one
warning and mergekit runs as if it were not installed.
"""

import sys

SUPPORTED_MERGEKIT = "mergekit==0.1.5"


def register() -> None:
    """Register ``finetuning_transfer`` with mergekit's registry, once.

    Safe to call any number of times; mergekit itself raises on a duplicate name.
    """
    from mergekit.merge_methods import registry

    from mergekit_ftt import METHOD_NAME
    from mergekit_ftt.merge_methods.finetuning_transfer import finetuning_transfer

    if all(method.spec.name != METHOD_NAME for method in registry.registered_methods()):
        registry.register(finetuning_transfer)


def _unregister() -> None:
    """Take ``finetuning_transfer`` out of mergekit's registry again, if it is there.

    A merge of the method without the checks of :func:`_check_before_run_merge` would
    skip the preflight (dtype policy, overwrite protection), so a half-installed plugin
    is worse than none. mergekit has no public way to unregister: this is best effort.
    """
    from mergekit_ftt import METHOD_NAME

    registry = sys.modules.get("mergekit.merge_methods.registry")
    methods = getattr(registry, "_METHODS", None)
    if isinstance(methods, dict):
        methods.pop(METHOD_NAME, None)


def _check_before_run_merge(merge_module) -> None:
    import functools
    import inspect

    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    run_merge = merge_module.run_merge
    if getattr(run_merge, "_ftt_checked", False):
        return
    signature = inspect.signature(run_merge)

    @functools.wraps(run_merge)
    def checked_run_merge(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return run_merge(*args, **kwargs)  # mergekit reports the wrong call itself
        arguments = bound.arguments
        config_name = _argument_of_type(arguments, MergeConfiguration)
        options_name = _argument_of_type(arguments, MergeOptions)
        out_path = arguments.get("out_path", _first_of_type(arguments, str))
        if config_name is None or options_name is None or not isinstance(out_path, str):
            return run_merge(*args, **kwargs)

        from mergekit_ftt.merge_options import transfer_options
        from mergekit_ftt.outputs import copy_generation_config
        from mergekit_ftt.preflight import check_merge

        options = arguments[options_name] = transfer_options(
            arguments[config_name], arguments[options_name]
        )
        arguments[config_name] = config = check_merge(arguments[config_name], out_path, options)
        result = run_merge(*bound.args, **bound.kwargs)
        copy_generation_config(config, out_path, options)
        return result

    checked_run_merge._ftt_checked = True
    merge_module.run_merge = checked_run_merge


def _argument_of_type(arguments, kind) -> "str | None":
    return next((name for name, value in arguments.items() if isinstance(value, kind)), None)


def _first_of_type(arguments, kind):
    name = _argument_of_type(arguments, kind)
    return None if name is None else arguments[name]


def _read_delta_folders(common_module) -> None:
    from mergekit_ftt.delta.loader import install

    install(common_module)


_AFTER_IMPORT = {
    "mergekit.common": _read_delta_folders,
    "mergekit.merge_methods": lambda _module: register(),
    "mergekit.merge": _check_before_run_merge,
}

_disabled = False


def _disable(module_name: str, error: BaseException) -> None:
    """Switch the plugin off for this process with one warning; mergekit keeps working."""
    import contextlib

    global _disabled
    if _disabled:
        return
    _disabled = True
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _MergekitFinder)]
    with contextlib.suppress(Exception):  # never let the clean-up break mergekit either
        _unregister()
    version = getattr(sys.modules.get("mergekit"), "__version__", "")
    print(
        f"mergekit-ftt: warning: could not extend {module_name} ({type(error).__name__}: "
        f"{error}); finetuning_transfer is unavailable and mergekit{' ' + version if version else ''}"
        f" runs without it. mergekit-ftt supports {SUPPORTED_MERGEKIT}.",
        file=sys.stderr,
    )


def _extend(module_name: str, module) -> None:
    if _disabled:
        return
    try:
        _AFTER_IMPORT[module_name](module)
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
    """A ``sys.meta_path`` finder that answers only for the modules in ``_AFTER_IMPORT``.

    It asks the finders after it for the real spec and wraps that spec's loader; it never
    removes itself from ``sys.meta_path`` (another thread may be importing meanwhile).
    """

    def __init__(self) -> None:
        self._finding: set[str] = set()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _AFTER_IMPORT or fullname in self._finding or _disabled:
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
        for name in _AFTER_IMPORT:
            if name in sys.modules:
                _extend(name, sys.modules[name])
        if not _disabled and not any(isinstance(f, _MergekitFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _MergekitFinder())
    except Exception as error:  # a broken plugin must never break the interpreter
        print(f"mergekit-ftt: warning: start-up hook disabled: {error!r}", file=sys.stderr)
