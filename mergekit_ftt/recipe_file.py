"""Read a recipe file the way ``mergekit-yaml`` does, with one-line errors.

The one reader of recipe files for every command (``ftt-inspect``, ``ftt-sweep``,
``ftt-delta extract``). The file is checked before mergekit (and with it torch) is
imported, so a wrong path is answered at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mergekit_ftt import METHOD_NAME
from mergekit_ftt.errors import FttError

if TYPE_CHECKING:
    from mergekit.config import MergeConfiguration

NOT_A_RECIPE = "give the YAML file mergekit-yaml would take"


def read_recipe(path: str | Path) -> MergeConfiguration:
    """The recipe at ``path`` as mergekit parses it, or an :class:`FttError` naming the file,
    the first problem in it and the fix."""
    path = Path(path)
    if path.is_dir():
        raise FttError(f"{path} is a folder, not a recipe file; {NOT_A_RECIPE}")
    if not path.is_file():
        raise FttError(f"no recipe file {path}; {NOT_A_RECIPE}")
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise FttError(f"cannot read recipe {path}: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise FttError(f"{path} is not valid YAML{where}: {problem}") from None
    if data is None:
        raise FttError(f"{path} is empty; {NOT_A_RECIPE}")
    if not isinstance(data, dict) or "merge_method" not in data:
        raise FttError(
            f"{path} is not a mergekit recipe: it has no `merge_method:` key; {NOT_A_RECIPE}"
        )
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    try:
        return MergeConfiguration.model_validate(data)
    except ValidationError as error:
        raise FttError(f"{path} is not a mergekit recipe: {_first_problem(error)}") from None
    except (ValueError, RuntimeError) as error:
        raise FttError(f"{path} is not a mergekit recipe: {error}") from None


def require_transfer(config: MergeConfiguration, path: str | Path | None, purpose: str) -> None:
    """Refuse a recipe of another merge method; ``purpose`` says what the command does with
    a ``finetuning_transfer`` recipe."""
    if config.merge_method != METHOD_NAME:
        raise FttError(
            f"{path or 'the recipe'} uses merge_method {config.merge_method!r}; {purpose}. "
            f"Write the transfer as `merge_method: {METHOD_NAME}`."
        )


def _first_problem(error) -> str:
    """pydantic's first validation error in one line: where, and what is wrong."""
    problems = error.errors()
    first = problems[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "the recipe"
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}"
