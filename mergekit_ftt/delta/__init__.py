"""Portable fine-tuning deltas: ``ftt-delta extract``, ``ftt-delta info`` and ``role: delta``.

A delta folder holds Δ = FT(M_s) − M_s once, so that a transfer onto any compatible target
reads the target and the delta instead of the fine-tuned model *and* its base:

- :mod:`.format`: the folder (``delta_config.json``, safetensors shards) and its reader;
- :mod:`.encode`: how Δ is stored: dense (exact or rounded), sparse, 1-bit sign;
- :mod:`.extract`: streaming extraction from a fine-tuned model and its base;
- :mod:`.loader`: the extension that lets mergekit's tensor loader read delta folders;
- :mod:`.info`: what a delta holds and how well it reconstructs Δ;
- :mod:`.cli`: the ``ftt-delta`` command.

Like :mod:`mergekit_ftt`, importing this package imports neither torch nor mergekit.
"""
