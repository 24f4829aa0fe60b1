"""The mergekit options a ``finetuning_transfer`` merge runs with when the user leaves them.

mergekit's defaults suit merges whose arithmetic dominates; a transfer mostly moves
bytes (docs/performance.md), so two of them change for it:

- ``--async-write``: mergekit writes each full output shard on a thread of its own while
  the next tensors are merged, instead of stopping the merge for the write;
- ``--out-shard-size 1B``: mergekit keeps a whole output shard in memory until it is full
  (with ``--async-write``, one more while it is written), so its default of 5 GB shards
  would hold up to 10 GB; 1 GB shards keep an 8B transfer under 3 GB of memory.

Only options that the command line left at mergekit's defaults change (click records
where each value came from); ``run_merge`` called from Python keeps the ``MergeOptions``
it is given.
"""

from __future__ import annotations

import logging

import click
from click.core import ParameterSource
from mergekit.common import parse_kmb
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_ftt import METHOD_NAME

LOG = logging.getLogger(__name__)

TRANSFER_DEFAULTS = {"async_write": True, "out_shard_size": parse_kmb("1B")}


def transfer_options(config: MergeConfiguration, options: MergeOptions) -> MergeOptions:
    """``options`` with :data:`TRANSFER_DEFAULTS` for what the command line left unset."""
    context = click.get_current_context(silent=True)
    if config.merge_method != METHOD_NAME or context is None:
        return options
    chosen = {
        name: value
        for name, value in TRANSFER_DEFAULTS.items()
        if context.get_parameter_source(name) is ParameterSource.DEFAULT
    }
    if chosen:
        LOG.info("%s defaults: %s", METHOD_NAME, chosen)
    return options.model_copy(update=chosen)
