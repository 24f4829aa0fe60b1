"""``ftt-inspect``: will this delta transfer to this target? Answered before the merge.

Reads the recipe ``mergekit-yaml`` takes, checks it with the merge's own preflight,
reports compatibility (architecture, tensors, dtypes, vocabularies, chat template) and
weight-space statistics of the delta against the gap between target and source base,
and gives a verdict calibrated on the miniature Table 3 (``ftt-demo --matrix``).

``from mergekit_ftt.inspect import inspect_recipe`` returns the report as a dictionary
(the JSON ``ftt-inspect --json`` writes). Importing the package itself imports neither
torch nor mergekit, so that ``ftt-inspect --help`` stays fast.
"""

from __future__ import annotations

__all__ = ["inspect_recipe"]


def __getattr__(name: str):
    if name == "inspect_recipe":
        from mergekit_ftt.inspect.api import inspect_recipe

        return inspect_recipe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
