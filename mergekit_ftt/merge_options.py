"""The mergekit options a ``finetuning_transfer`` merge runs with when the user leaves them.

Two of mergekit's defaults change for a transfer (docs/performance.md):

- ``--out-shard-size 1B``: mergekit keeps a whole output shard in memory until it is full
  (the option counts bytes), so its default of 5 GB shards held 5.5 GB at 8B shapes;
  1 GB shards keep an 8B transfer under 3 GB;
- ``-j 2`` (at most the machine's cores): the fused kernel
  (:mod:`mergekit_ftt.merge_methods.kernel`) splits each tensor between torch's threads,
  with one join per tensor. Side by side at 1b shapes on the shared 2-core machine (load
  average 4–6, cold cache, 3 rounds) ``-j 2`` took 39.8 s (36.8–56.1) against 54.8 s
  (49.7–59.9) for ``-j 1`` (benchmarks/results/1b-2026-12-04-0451-kernel.md). The old
  torch kernel had been 4× to 60× slower with two threads under load: each of its ~10
  elementwise ops ended in an OpenMP barrier that waited for a descheduled thread.

``--async-write`` (a shard written on a thread while the next tensors merge) stays off: side
by side at 1b shapes it changed nothing (23.6 s with it, 23.5 s without, cold cache, with
the torch kernel), and it holds one more shard in memory.

Only options that the command line left at mergekit's defaults change (click records
where each value came from); ``run_merge`` called from Python keeps the ``MergeOptions``
it is given, and torch's threads.
"""

from __future__ import annotations

import logging
import os

import click
import torch
from click.core import ParameterSource
from mergekit.common import parse_kmb
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_ftt import METHOD_NAME

LOG = logging.getLogger(__name__)

TRANSFER_DEFAULTS = {"out_shard_size": parse_kmb("1B"), "num_threads": min(2, os.cpu_count() or 1)}


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
