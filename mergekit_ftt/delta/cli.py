"""``ftt-delta``: extract a fine-tuning delta once, inspect it, apply it with mergekit-yaml.

    ftt-delta extract RECIPE.yml OUT_DIR            # the recipe's source_finetuned − source_base
    ftt-delta extract OUT_DIR --finetuned X --base Y
    ftt-delta extract ... --dtype bfloat16 --no-exact         # rounded, half of float32
    ftt-delta extract ... --compress dare --density 0.1       # sparse, mergekit's sparsify
    ftt-delta extract ... --compress sign --scale row         # 1 bit per element
    ftt-delta info OUT_DIR [--tensors] [--json] [--verify]

Apply: a recipe input ``{model: OUT_DIR, parameters: {role: delta, weight: α}}``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from mergekit_ftt.cli import Stages, add_options, entry_point, library_logs, options_from
from mergekit_ftt.delta.options import ExtractOptions
from mergekit_ftt.errors import FttError
from mergekit_ftt.recipe_file import read_recipe, require_transfer

PROG = "ftt-delta"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    extract = sub.add_parser(
        "extract",
        help="write Δ = finetuned − base to a delta folder",
        description="Write Δ = finetuned − base to a delta folder, streaming tensor by tensor. "
        "Give a finetuning_transfer RECIPE (its source_finetuned and source_base) and OUT_DIR, "
        "or OUT_DIR with --finetuned and --base.",
    )
    extract.add_argument("paths", nargs="+", metavar="[RECIPE] OUT_DIR")
    extract.add_argument("--finetuned", help="the fine-tuned model (Hub id or folder)")
    extract.add_argument("--base", help="the model it was fine-tuned from")
    add_options(extract, ExtractOptions)
    extract.add_argument("--verbose", action="store_true", help="library logs on the terminal")
    info = sub.add_parser("info", help="what a delta folder holds, and its reconstruction error")
    info.add_argument("folder", type=Path)
    info.add_argument("--tensors", action="store_true", help="one row per tensor as well")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--verify", action="store_true", help="also check every file's sha256")
    return parser


def recipe_sources(recipe: Path) -> tuple[str, str]:
    """(source_finetuned, source_base) of a finetuning_transfer recipe."""
    config = read_recipe(recipe)
    from mergekit_ftt.preflight.recipe import model_entries

    require_transfer(
        config,
        recipe,
        "ftt-delta extract takes the fine-tuned model and its base from a transfer recipe",
    )
    roles: dict[str, list[str]] = {}
    for model, parameters in model_entries(config):
        roles.setdefault((parameters or {}).get("role"), []).append(str(model))
    finetuned, bases = roles.get("source_finetuned", []), roles.get("source_base", [])
    if len(finetuned) != 1 or len(bases) != 1:
        raise FttError(
            f"{recipe} has {len(finetuned)} source_finetuned and {len(bases)} source_base "
            "models; extraction needs exactly one of each. Name them with "
            f"`{PROG} extract OUT_DIR --finetuned MODEL --base MODEL`."
        )
    return finetuned[0], bases[0]


def _sources(args: argparse.Namespace) -> tuple[str, str, Path]:
    by_flags = args.finetuned is not None or args.base is not None
    if by_flags:
        if args.finetuned is None or args.base is None:
            raise FttError("give both --finetuned and --base (or a recipe instead of both).")
        if len(args.paths) != 1:
            raise FttError("with --finetuned and --base, give only OUT_DIR.")
        return args.finetuned, args.base, Path(args.paths[0])
    if len(args.paths) != 2:
        raise FttError("give RECIPE.yml OUT_DIR, or OUT_DIR with --finetuned and --base.")
    finetuned, base = recipe_sources(Path(args.paths[0]))
    return finetuned, base, Path(args.paths[1])


def run_extract(args: argparse.Namespace) -> None:
    options = options_from(args, ExtractOptions)  # a bad combination is named before any work
    finetuned, base, out = _sources(args)
    stages = Stages(PROG)
    with library_logs(out.with_name(out.name + ".log"), args.verbose):
        from mergekit_ftt.delta.extract import extract
        from mergekit_ftt.delta.info import describe, render

        config = extract(finetuned, base, out, options, progress=stages)
    stages(f"wrote {out}")
    print(render(describe(config, out)))
    print(
        f"\nApply it with mergekit-yaml, e.g.\n  models:\n    - model: {out}\n"
        "      parameters: {role: delta, weight: 1.0}\n"
        f"  tokenizer: {{source: {out}}}   # the fine-tuned model's tokenizer and chat template"
    )


def run_info(args: argparse.Namespace) -> None:
    from mergekit_ftt.delta.info import open_and_describe, render

    facts = open_and_describe(args.folder, verify=args.verify)
    if args.json:
        if not args.tensors:
            facts.pop("per_tensor")
        print(json.dumps(facts, indent=2, ensure_ascii=False))
    else:
        print(render(facts, per_tensor=args.tensors))
        if args.verify:
            print("\nall files match the sha256 in delta_config.json")


@entry_point(PROG)
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    {"extract": run_extract, "info": run_info}[args.command](args)
