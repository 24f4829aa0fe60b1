"""The mergekit options a ``finetuning_transfer`` merge runs with when the user leaves them.

Four of mergekit's defaults change for a transfer (docs/performance.md):

- ``--async-write --write-threads 2 --out-shard-size 250M``: full shards are written on two
  of mergekit's writer threads while the next tensors merge, instead of stopping the
  merge. Side by side at 8B shapes (20 of 32 layers, cold cache, 3 rounds, 2-core
  machine): 39.9 s (39.3–40.6), against 42.0 s (33.8–43.0) with one writer and 500 MB
  shards and 43.2 s (42.4–44.1) writing synchronously with 1 GB shards (the previous
  default); the I/O floor 36.3 s
  (benchmarks/results/llama3-8b-20layers-2026-12-04-1341-writers.md). mergekit holds a
  whole output shard in memory until it is written (the option counts bytes; its default
  of 5 GB shards held 5.5 GB at 8B shapes), and the adapter lets at most ``write_threads``
  shards be in flight (:func:`mergekit_ftt.mergekit_adapter._bounded_writes`): two shards
  writing and one filling hold 750 MB, as one 1 GB shard did (2.46 GB anonymous memory
  in all, both ways);
- ``-j 2`` (at most the machine's cores): the fused kernel
  (:mod:`mergekit_ftt.merge_methods.kernel`) splits each tensor between torch's threads,
  with one join per tensor. Side by side at 1b shapes on the shared 2-core machine (load
  average 4–6, cold cache, 3 rounds) ``-j 2`` took 39.8 s (36.8–56.1) against 54.8 s
  (49.7–59.9) for ``-j 1`` (benchmarks/results/1b-2026-12-04-0451-kernel.md). The old
  torch kernel had been 4× to 60× slower with two threads under load: each of its ~10
  elementwise ops ended in an OpenMP barrier that waited for a descheduled thread.

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

TRANSFER_DEFAULTS = {
    "async_write": True,
    "write_threads": 2,
    "out_shard_size": parse_kmb("250M"),
    "num_threads": min(2, os.cpu_count() or 1),
}


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
