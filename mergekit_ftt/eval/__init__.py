"""Evaluation through lm-eval: suites as task/group YAML, a runner and a paper-shaped report.

The suites are data, in the top-level ``eval/`` folder. Importing this package imports
neither lm-eval, torch nor vLLM; the functions below import them when called.
"""

from mergekit_ftt.eval.backends import BackendUnavailable, default_backend
from mergekit_ftt.eval.options import BackendOptions, RunOptions
from mergekit_ftt.eval.report import Table, build_table, write_report
from mergekit_ftt.eval.runner import ModelSpec, evaluate_models
from mergekit_ftt.eval.suites import SUITES_DIR, Column, Suite, load_suite

__all__ = [
    "SUITES_DIR",
    "BackendOptions",
    "BackendUnavailable",
    "Column",
    "ModelSpec",
    "RunOptions",
    "Suite",
    "Table",
    "build_table",
    "default_backend",
    "evaluate_models",
    "load_suite",
    "write_report",
]
