"""``ftt-sweep``: choose α, and α per module kind, by measurement.

- :mod:`~mergekit_ftt.sweep.grid`: the variants of a ``finetuning_transfer`` recipe, each
  a real mergekit recipe (every ``source_finetuned`` / ``delta`` weight scaled by α, on all
  tensors or, with per-tensor filters, on one module kind).
- :mod:`~mergekit_ftt.sweep.build`: the variants' weights from one read of the inputs,
  built in memory for lm-eval's hf backend or written through mergekit one at a time.
- :mod:`~mergekit_ftt.sweep.report`: score against α (table, CSV, PNG), best α, best recipe.
- :mod:`~mergekit_ftt.sweep.cli`: the command.

Importing this package imports neither torch, mergekit nor lm-eval.
"""
