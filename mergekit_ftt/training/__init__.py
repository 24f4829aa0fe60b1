"""Supervised fine-tuning with TRL for fine-tuning transfer experiments.

``sft`` is ``ftt-train`` (TRL's SFT script; ``config`` finds and reads its YAML files,
``checks`` runs before anything is loaded, ``trainer`` adds the paper's summed loss),
``fetch`` saves OLMo 2 intermediate checkpoints (``ftt-fetch-checkpoints``), ``iterate``
chains transfer and fine-tuning rounds (``ftt-iterate``) and ``smoke`` makes the inputs of a
CPU smoke run. The configs themselves are data: the top-level ``training/`` folder.
"""
