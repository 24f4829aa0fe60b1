"""Fine-tuning transfer for mergekit: ``target + Σ weight · (finetuned − source_base)``.

Importing this package is cheap on purpose: the ``.pth`` start-up hook imports
:mod:`mergekit_ftt.hook` in every interpreter, so nothing here may import torch or
mergekit. The merge method lives in :mod:`mergekit_ftt.merge_methods`.
"""

__version__ = "0.1.0"

METHOD_NAME = "finetuning_transfer"
PAPER_URL = "https://arxiv.org/abs/2503.20110"
