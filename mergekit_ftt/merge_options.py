"""The mergekit options a ``finetuning_transfer`` merge runs with when the user leaves them.

Two of mergekit's defaults change for a transfer (docs/performance.md):

- ``--out-shard-size 1B``: mergekit keeps a whole output shard in memory until it is full
  (the option counts bytes), so its default of 5 GB shards held 5.5 GB at 8B shapes;
  1 GB shards keep an 8B transfer under 3 GB;
- ``-j 1``: the kernel is a chain of short elementwise ops. With more torch threads each
  one is an OpenMP parallel region that ends in a barrier. On a quiet 2-core machine two
  threads ran the kernel 1.4× faster, but whenever another process (or the merge's own
  reading and writing) takes a core, every barrier waits for a descheduled thread: 4× to
  60× slower, as the load rose from 2.5 to 9. One thread never waits and leaves the other
  cores to the I/O.

``--async-write`` (a shard written on a thread while the next tensors merge) stays off: side
by side at 1b shapes it changed nothing (23.6 s with it, 23.5 s without, cold cache), since
the merge's main thread is the bottleneck, and it holds one more shard in memory.

Only options that the command line left at mergekit's defaults change (click records
where each value came from); ``run_merge`` called from Python keeps the ``MergeOptions``
it is given, and torch's threads.
"""

from __future__ import annotations

import logging

import click
import torch
from click.core import ParameterSource
from mergekit.common import parse_kmb
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_ftt import METHOD_NAME

LOG = logging.getLogger(__name__)

TRANSFER_DEFAULTS = {"out_shard_size": parse_kmb("1B"), "num_threads": 1}


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
    if "num_threads" in chosen:  # mergekit applied its options before run_merge
        torch.set_num_threads(chosen["num_threads"])
    return options.model_copy(update=chosen)
