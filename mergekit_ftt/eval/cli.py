"""``ftt-eval``: ``run`` a suite on models through lm-eval, ``report`` result folders as a table.

    ftt-eval run --suite llama3-instruct --model "Llama 3.0=meta-llama/Meta-Llama-3-8B" \\
        --model "Llama 3.0 + Δ3.1=./merged" --base "Llama 3.0 + Δ3.1=Llama 3.0" --output results
    ftt-eval report results --out report

The options of ``run`` are the fields of :mod:`mergekit_ftt.eval.options`; lm-eval's
spellings (``--batch_size``, ``--include_path``, ``--model_args``...) work too.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from mergekit_ftt.cli import (
    add_options,
    entry_point,
    library_logs,
    options_from,
    require_writable,
)
from mergekit_ftt.errors import FttError
from mergekit_ftt.eval.options import BackendOptions, RunOptions
from mergekit_ftt.eval.suites import shipped_suites

LOG_FILE = "ftt-eval.log"  # in the --output folder


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"expected LABEL=VALUE, got {text!r}")
    return key, value


def _base_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base",
        type=_pair,
        action="append",
        default=[],
        metavar="LABEL=BASE_LABEL",
        help="mark LABEL as a '+ Δ' row transferred onto BASE_LABEL (its gain is shown)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftt-eval", description=__doc__.split("\n\n")[0].strip("`")
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="evaluate models on a suite or on lm-eval tasks")
    run.add_argument(
        "--model",
        type=_pair,
        action="append",
        required=True,
        metavar="LABEL=PATH",
        help="a model to evaluate (local folder or Hub id); repeat for several",
    )
    _base_flag(run)
    what = run.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--suite", help=f"shipped: {', '.join(shipped_suites())}, or one in --include-path"
    )
    what.add_argument("--tasks", help="comma-separated lm-eval task or group names")
    run.add_argument(
        "--output",
        "--output_path",
        required=True,
        help="result folder (one subfolder per model)",
    )
    run.add_argument(
        "--via-olmes",
        action="store_true",
        help="delegate to the `olmes` CLI (must be on PATH) with the suite's OLMES task ids",
    )
    run.add_argument("--olmes-gpus", type=int, default=1, help="GPUs per olmes run")
    run.add_argument(
        "--verbose", action="store_true", help=f"library logs on the terminal, not in {LOG_FILE}"
    )
    add_options(run, RunOptions)
    add_options(run, BackendOptions)

    report = sub.add_parser("report", help="table, CSV and chart from result folders")
    report.add_argument("dirs", nargs="+", help="result folders (of `run`, or any lm-eval output)")
    report.add_argument("--out", required=True, help="folder for report.md, report.csv, report.png")
    _base_flag(report)
    report.add_argument("--title")
    return parser


# What `olmes` is told (olmes.olmes_command); every other option of `run` would be ignored.
OLMES_OPTIONS = {"dtype", "add_bos_token", "max_model_len", "trust_remote_code", "limit"}
OLMES_OPTIONS |= {"include_path"}  # where the suite is found


def _refuse_unused_by_olmes(args: argparse.Namespace) -> None:
    """An option --via-olmes cannot pass on is refused, never accepted and ignored."""
    names = [*RunOptions.model_fields, *BackendOptions.model_fields]
    given = [name for name in names if hasattr(args, name) and name not in OLMES_OPTIONS]
    given += ["base"] if args.base else []
    if given:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in given)
        raise FttError(
            f"--via-olmes runs OLMES with its own settings and cannot apply {flags}: drop "
            f"{'it' if len(given) == 1 else 'them'}, or drop --via-olmes to run the suite "
            "through lm-eval (then `ftt-eval report --base` marks the '+ Δ' rows)"
        )


def _run(args: argparse.Namespace) -> None:
    from mergekit_ftt.eval import olmes
    from mergekit_ftt.eval.runner import ModelSpec, evaluate_models

    run_options = options_from(args, RunOptions)
    backend_options = options_from(args, BackendOptions)
    bases = dict(args.base)
    models = [ModelSpec(label, path, bases.get(label)) for label, path in args.model]
    require_writable(args.output, "--output", folder=True)
    if args.via_olmes:
        if not args.suite:
            raise FttError("--via-olmes runs a suite's OLMES task ids: give --suite, not --tasks")
        _refuse_unused_by_olmes(args)
        olmes.run_suite(
            models,
            args.suite,
            args.output,
            backend_options,
            args.olmes_gpus,
            run_options.limit,
            run_options.include_path,
        )
        return
    # lm-eval's INFO lines, bars and git calls go to the log, the result paths to the terminal.
    with library_logs(Path(args.output) / LOG_FILE, args.verbose):
        written = evaluate_models(
            models,
            args.suite or args.tasks.split(","),
            args.output,
            options=backend_options,
            **run_options.model_dump(),
        )
    for label, files in written.items():
        for task, path in files.items():
            print(f"{label}\t{task}\t{path}")


def _report(args: argparse.Namespace) -> None:
    from mergekit_ftt.eval.report import build_table, to_markdown, write_report

    require_writable(args.out, "--out", folder=True)
    table = build_table(args.dirs, dict(args.base))
    paths = write_report(table, args.out, args.title)
    print(to_markdown(table), end="")
    print("wrote " + ", ".join(str(p) for p in paths.values()))


@entry_point("ftt-eval")
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (_run if args.command == "run" else _report)(args)


if __name__ == "__main__":
    sys.exit(main())
