"""The errors a user can fix: the root of every error mergekit-ftt raises on purpose.

Every message names the problem and the fix. An :class:`FttError` is a click
``ClickException`` because mergekit's own commands (``mergekit-yaml``, ``mergekit-multi``)
are click commands: raised inside them, by the preflight or the method, it reaches the user
as ``Error: MESSAGE`` with no traceback; our ``ftt-*`` commands print it as
``PROG: error: MESSAGE`` (:func:`mergekit_ftt.cli.entry_point`). So no error is ever
converted into another on its way out.
"""

from __future__ import annotations

import click


class FttError(click.ClickException):
    """A problem the user can fix; the message names it and says how."""


class FinetuningTransferError(FttError, ValueError):
    """A ``finetuning_transfer`` configuration that cannot be merged (also a ``ValueError``,
    what mergekit's in-memory API raises for bad parameters)."""


class DeltaError(FttError):
    """A delta folder that cannot be read or applied."""
