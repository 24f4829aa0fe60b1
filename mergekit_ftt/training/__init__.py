"""Supervised fine-tuning with TRL for fine-tuning transfer experiments.

``sft`` is the training entry point (``ftt-train``), ``data`` loads the dataset mixture,
``fetch`` saves OLMo 2 intermediate checkpoints (``ftt-fetch-checkpoints``) and ``iterate``
chains transfer and fine-tuning rounds (``ftt-iterate``). Nothing here imports torch,
TRL or datasets at import time of the package itself.
"""
