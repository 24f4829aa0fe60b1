"""``ftt-demo``: the paper's checkpoint-to-checkpoint transfer in miniature, offline on a CPU.

A tiny OLMo 2 is pre-trained on synthetic prose to two checkpoints of one run (M_a, M_b);
M_a is fine-tuned with the project's TRL code, its delta moved onto M_b with the real
``mergekit-yaml`` (``finetuning_transfer``) and every model evaluated with the project's
lm-eval runner on held-out chat questions. See :mod:`mergekit_ftt.demo.corpus` for the task.
"""
