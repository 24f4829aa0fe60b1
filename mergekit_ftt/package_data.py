"""The data folders beside the code: ``training/``, ``eval/`` and ``recipes/``.

In a checkout they are the repository's top-level folders. The wheel carries them as
package data under ``mergekit_ftt/_data/`` (``force-include`` in pyproject.toml), so the
commands find a config, suite or recipe by name when installed and by path anywhere.
Config files may start from another with ``include:``, as lm-eval task YAMLs do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml

from mergekit_ftt.errors import FttError

DataFolder = Literal["training", "eval", "recipes"]
YAML_SUFFIXES = (".yaml", ".yml")

_PACKAGE = Path(__file__).resolve().parent


def data_folder(name: DataFolder) -> Path:
    """The installed copy (``mergekit_ftt/_data/NAME``), else the checkout's ``NAME/``."""
    for folder in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if folder.is_dir():
            return folder
    raise FttError(
        f"the {name}/ data folder is missing next to {_PACKAGE}; reinstall mergekit-ftt "
        "(pip install mergekit-ftt) or run from a full checkout."
    )


def shipped_names(kind: DataFolder) -> list[str]:
    """Names of the shipped YAML files of ``kind`` (sub-folders as ``accelerate/zero3``),
    without files whose name starts with ``_`` (pieces other files include)."""
    folder = data_folder(kind)
    return sorted(
        path.relative_to(folder).with_suffix("").as_posix()
        for path in folder.rglob("*")
        if path.suffix in YAML_SUFFIXES and not path.name.startswith("_")
    )


def find_data_file(kind: DataFolder, name_or_path: str | Path) -> Path:
    """``name_or_path`` itself when it is a file, else the shipped file of that name
    (``olmo2_m4_math`` → ``training/olmo2_m4_math.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    folder = data_folder(kind)
    for candidate in (folder / path, *(folder / f"{path}{suffix}" for suffix in YAML_SUFFIXES)):
        if candidate.is_file():
            return candidate
    raise FttError(
        f"{str(name_or_path)!r} is neither a file nor a shipped {kind} file; shipped: "
        f"{', '.join(shipped_names(kind))} (in {folder})."
    )


def with_includes(
    config: dict[str, Any], folder: Path, shipped: DataFolder | None = None
) -> dict[str, Any]:
    """``config`` on top of the file its ``include:`` names (recursively; mappings merge key by
    key, anything else is replaced). The file is looked for in ``folder`` (the including
    file's), then by name among the ``shipped`` files."""
    config = dict(config)
    include = config.pop("include", None)
    if include is None:
        return config
    path = folder / include
    if not path.is_file():
        if shipped is None:
            raise FttError(f"include: {include!r} not found in {folder}.")
        path = find_data_file(shipped, include)
    base = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return _merge(with_includes(base, path.parent, shipped), config)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        both_mappings = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _merge(base[key], value) if both_mappings else value
    return merged
