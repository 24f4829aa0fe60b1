"""``ftt-eval``: ``run`` a suite on models through lm-eval, ``report`` result folders as a table."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from mergekit_ftt.eval import backends, olmes
from mergekit_ftt.eval.backends import BackendOptions, BackendUnavailable
from mergekit_ftt.eval.suites import shipped_suites


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"expected LABEL=VALUE, got {text!r}")
    return key, value


def _limit(text: str) -> float | int:
    value = float(text)
    return int(value) if value >= 1 else value  # lm-eval: below 1 is a fraction


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def _add_run(sub) -> None:
    run = sub.add_parser("run", help="evaluate models on a suite or on lm-eval tasks")
    run.add_argument(
        "--model",
        type=_pair,
        action="append",
        required=True,
        metavar="LABEL=PATH",
        help="a model to evaluate (local folder or Hub id); repeat for several",
    )
    run.add_argument(
        "--base",
        type=_pair,
        action="append",
        default=[],
        metavar="LABEL=BASE_LABEL",
        help="mark LABEL as a '+ Δ' row transferred onto BASE_LABEL (for the report)",
    )
    what = run.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--suite", help=f"shipped: {', '.join(shipped_suites())}, or one in --include-path"
    )
    what.add_argument("--tasks", help="comma-separated lm-eval task or group names")
    run.add_argument("--output", required=True, help="result folder (one subfolder per model)")
    run.add_argument(
        "--include-path", action="append", default=[], help="extra lm-eval task YAML folder"
    )
    run.add_argument(
        "--backend",
        choices=backends.BACKENDS,
        help="default: vllm on a CUDA machine with vLLM, else hf",
    )
    run.add_argument(
        "--limit", type=_limit, help="examples per task (a number below 1 is a fraction)"
    )
    run.add_argument(
        "--force", action="store_true", help="recompute tasks that already have results"
    )
    run.add_argument(
        "--chat-template", type=_bool, metavar="true|false", help="override the suite's setting"
    )
    run.add_argument(
        "--fewshot-as-multiturn",
        type=_bool,
        metavar="true|false",
        help="override the suite's setting",
    )
    run.add_argument("--device", help="hf backend: cpu, cuda, cuda:N")
    run.add_argument("--dtype", help="default: float32 on CPU, else the checkpoint's")
    run.add_argument("--batch-size", help="default: 1 (hf), auto (vllm)")
    run.add_argument("--tensor-parallel-size", type=int, default=1)
    run.add_argument("--data-parallel-size", type=int, default=1)
    run.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    run.add_argument("--max-model-len", type=int)
    run.add_argument("--add-bos-token", type=_bool, metavar="true|false")
    run.add_argument("--seed", type=int, default=1234)
    run.add_argument("--trust-remote-code", action="store_true")
    run.add_argument(
        "--via-olmes",
        action="store_true",
        help="delegate to the `olmes` CLI (must be on PATH) with the suite's OLMES task ids",
    )
    run.add_argument("--olmes-gpus", type=int, default=1)


def _add_report(sub) -> None:
    report = sub.add_parser("report", help="table, CSV and chart from result folders")
    report.add_argument("dirs", nargs="+", help="result folders (of `run`, or any lm-eval output)")
    report.add_argument("--out", required=True, help="folder for report.md, report.csv, report.png")
    report.add_argument(
        "--base", type=_pair, action="append", default=[], metavar="LABEL=BASE_LABEL"
    )
    report.add_argument("--title")


def _options(args: argparse.Namespace) -> BackendOptions:
    batch = args.batch_size
    return BackendOptions(
        device=args.device,
        dtype=args.dtype,
        batch_size=int(batch) if batch and batch.isdigit() else batch,
        tensor_parallel_size=args.tensor_parallel_size,
        data_parallel_size=args.data_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        add_bos_token=args.add_bos_token,
        seed=args.seed,
        trust_remote_code=args.trust_remote_code,
    )


def _run(args: argparse.Namespace) -> None:
    from mergekit_ftt.eval.runner import ModelSpec, evaluate_models

    bases = dict(args.base)
    models = [ModelSpec(label, path, bases.get(label)) for label, path in args.model]
    if args.via_olmes:
        if not args.suite:
            raise ValueError("--via-olmes runs a suite's OLMES task ids: give --suite, not --tasks")
        olmes.run_suite(
            models,
            args.suite,
            args.output,
            _options(args),
            args.olmes_gpus,
            args.limit,
            args.include_path,
        )
        return
    written = evaluate_models(
        models,
        args.suite or args.tasks.split(","),
        args.output,
        backend=args.backend,
        options=_options(args),
        include_path=args.include_path,
        limit=args.limit,
        force=args.force,
        apply_chat_template=args.chat_template,
        fewshot_as_multiturn=args.fewshot_as_multiturn,
    )
    for label, files in written.items():
        for task, path in files.items():
            print(f"{label}\t{task}\t{path}")


def _report(args: argparse.Namespace) -> None:
    from mergekit_ftt.eval.report import build_table, to_markdown, write_report

    table = build_table(args.dirs, dict(args.base))
    paths = write_report(table, args.out, args.title)
    print(to_markdown(table), end="")
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ftt-eval", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_report(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        (_run if args.command == "run" else _report)(args)
    except (ValueError, FileNotFoundError, BackendUnavailable, olmes.OlmesUnavailable) as err:
        print(f"ftt-eval: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
