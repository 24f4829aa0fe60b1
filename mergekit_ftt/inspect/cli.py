"""``ftt-inspect RECIPE.yml [--json FILE] [--plot FILE.png|.svg|.pdf]``: will this delta transfer?

Reads the recipe mergekit-yaml takes (finetuning_transfer), streams the three models
tensor by tensor and prints compatibility, weight-space statistics and a verdict, before
any merge is run. ``python -m mergekit_ftt inspect ...`` does the same.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

from mergekit_ftt.cli import entry_point, library_logs, require_writable
from mergekit_ftt.errors import FttError
from mergekit_ftt.inspect.report import PLOT_FORMATS
from mergekit_ftt.recipe_file import read_recipe

PROG = "ftt-inspect"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Will this fine-tuning delta transfer to this target? Reads a "
        "finetuning_transfer recipe (the file mergekit-yaml takes) and reports compatibility, "
        "weight-space statistics per tensor, layer, module kind and model, and a verdict "
        "calibrated on the miniature Table 3 (ftt-demo --matrix). Nothing is merged or written "
        "unless --json / --plot ask for it.",
    )
    parser.add_argument(
        "recipe", type=Path, help="mergekit YAML recipe (merge_method: finetuning_transfer)"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the full report as JSON")
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="write per-layer statistics as a plot (.png, .svg or .pdf)",
    )
    parser.add_argument(
        "--transformers-cache", default=None, help="Hugging Face cache folder, as for mergekit-yaml"
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="as for mergekit-yaml")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--log-file", type=Path, default=None, help="library logs go here (default: not kept)"
    )
    parser.add_argument("--verbose", action="store_true", help="library logs on the terminal")
    return parser


def _refuse_overwrite(path: Path | None, flag: str) -> None:
    if path is not None:
        require_writable(path, flag)  # before the analysis, not after it


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _refuse_overwrite(args.json, "--json")
    _refuse_overwrite(args.plot, "--plot")
    if args.plot is not None and args.plot.suffix.lower() not in PLOT_FORMATS:
        raise FttError(f"--plot {args.plot}: give a file name ending in {', '.join(PLOT_FORMATS)}")

    recipe = read_recipe(args.recipe)  # a wrong file is named before mergekit loads

    from mergekit.options import MergeOptions

    from mergekit_ftt.inspect.api import inspect_recipe
    from mergekit_ftt.inspect.report import format_report, plot

    options = MergeOptions(
        transformers_cache=args.transformers_cache, trust_remote_code=args.trust_remote_code
    )
    with library_logs(args.log_file or os.devnull, args.verbose):
        report = inspect_recipe(recipe, options, progress=not args.no_progress, path=args.recipe)
    print(format_report(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        print(f"  json: {args.json}")
    if args.plot is not None:
        print(f"  png: {plot(report, args.plot)}")
    return 0


main = entry_point(PROG)(run)
