"""``ftt-sweep``: evaluate a ``finetuning_transfer`` recipe at several α, and α per module kind.

    ftt-sweep recipe.yml --alphas 0,0.25,0.5,0.75,1,1.25,1.5 --suite llama3-instruct --out sweep
    ftt-sweep ftt-demo-out/transfer/transfer.yml --alphas 0,0.5,1,1.5 \\
        --suite ftt-demo --include-path ftt-demo-out/data/eval_tasks \\
        --modules attention,mlp,embeddings --out sweep

Every variant is a mergekit recipe (``OUT/recipes/<kind>@<α>.yml``); the inputs are read
once per sweep; with the hf backend and enough memory each variant is built in memory
and evaluated without being written, otherwise it is written by mergekit, evaluated and
deleted. Results go to ``OUT/eval/<variant>/`` (lm-eval's files, as ``ftt-eval run``
writes them), so a rerun resumes; the report (table, CSV, PNG, JSON) and the best
variant's recipe go to ``OUT/report/``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mergekit_ftt.cli import (
    Stages,
    add_options,
    entry_point,
    library_logs,
    options_from,
    require_writable,
)
from mergekit_ftt.errors import FttError
from mergekit_ftt.eval.options import BackendOptions, RunOptions
from mergekit_ftt.eval.suites import shipped_suites
from mergekit_ftt.sweep.grid import (
    ALL,
    MODULE_KINDS,
    SCALED_ROLES,
    Variant,
    format_alpha,
    load_recipe,
    parse_alphas,
    parse_kinds,
    scaled_inputs,
)

PROG = "ftt-sweep"
RUN_FILE = "sweep.json"
LOG_FILE = "sweep.log"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0].replace("``", ""),
        epilog="\n\n".join(__doc__.split("\n\n")[1:]).replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "recipe",
        type=Path,
        metavar="RECIPE.yml",
        help="a finetuning_transfer recipe (mergekit YAML with a models: list)",
    )
    parser.add_argument(
        "--alphas",
        required=True,
        help=f"comma-separated α values, e.g. 0,0.25,0.5,0.75,1,1.25,1.5: each variant "
        f"multiplies the weight of every {'/'.join(SCALED_ROLES)} input by α",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--suite",
        help=f"an evaluation suite: shipped ({', '.join(shipped_suites())}) or one in "
        "--include-path",
    )
    what.add_argument("--tasks", help="comma-separated lm-eval task or group names")
    parser.add_argument(
        "--modules",
        metavar="KINDS",
        help=f"also sweep α on one module kind at a time, the other tensors at α = 1: "
        f"comma-separated from {', '.join(MODULE_KINDS)}",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder (a rerun resumes it)"
    )
    parser.add_argument(
        "--build",
        choices=("auto", "memory", "disk"),
        default="auto",
        help="memory: build each variant in memory (hf backend); disk: write each variant "
        "with mergekit, evaluate, delete it; auto (default): memory when the hf backend is "
        "used and the inputs and the model fit in 80%% of the available RAM",
    )
    # The evaluation options are ftt-eval run's own (--force re-runs every variant).
    add_options(parser, RunOptions)
    add_options(parser, BackendOptions)
    parser.add_argument(
        "--verbose",
        action="store_true",
        help=f"library logs on the terminal instead of OUT/{LOG_FILE}",
    )
    return parser


@contextlib.contextmanager
def _removed_unless_recorded(out: Path):
    """An ``--out`` this run made is removed if the run is refused before it holds a sweep
    (``sweep.json``): a refused run leaves nothing behind; a recorded one can resume."""
    made = not out.exists()
    try:
        yield
    except (FttError, KeyboardInterrupt):
        if made and not (out / RUN_FILE).exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def _check_out(out: Path) -> None:
    """A new folder, an empty one, or an earlier sweep's (resumed); never anything else.
    (A folder holding only the log of a sweep that stopped at a check counts as empty.)"""
    if out.exists() and not out.is_dir():
        raise FttError(f"--out {out} is a file; give a folder")
    stray = {p.name for p in out.iterdir()} - {LOG_FILE} if out.is_dir() else set()
    if stray and not (out / RUN_FILE).exists():
        raise FttError(f"{out} is not empty and holds no sweep; choose another --out")


class Sweep:
    """One ``ftt-sweep`` run: its settings, variants, and where it writes."""

    def __init__(self, args: argparse.Namespace, stages: Stages) -> None:
        self.args = args
        self.stages = stages
        self.out: Path = args.out
        self.recipes = self.out / "recipes"
        self.eval_dir = self.out / "eval"
        self.scratch = self.out / "variants"  # a variant written for evaluation, then deleted
        self.run_options: RunOptions = options_from(args, RunOptions)
        self.options: BackendOptions = options_from(args, BackendOptions)
        self.timings: dict[str, dict[str, float]] = {}
        self.model = None  # the in-memory model, made when the first variant is built

    # --- checks before any merge ---------------------------------------------------

    def resolve_evaluation(self):
        """The suite, backend and options; unknown tasks or suites fail here, first, then
        every model of the recipe and dataset of the suite out of reach, named at once."""
        from mergekit_ftt.eval import backends
        from mergekit_ftt.eval.runner import missing_datasets, resolve_suite, task_manager
        from mergekit_ftt.preflight.models import missing_recipe_models
        from mergekit_ftt.sources import raise_unavailable

        args, run = self.args, self.run_options
        self.backend = run.backend or backends.default_backend()
        include = [Path(p) for p in run.include_path]
        backends.require_backend(self.backend, self.options)
        self.suite = resolve_suite(
            args.suite or args.tasks.split(","),
            include,
            run.apply_chat_template,
            run.fewshot_as_multiturn,
        )
        manager = task_manager(include, [column.task for column in self.suite.columns])
        models = missing_recipe_models(load_recipe(self.args.recipe))
        raise_unavailable([*models, *missing_datasets(self.suite, manager, include)])

    def make_variants(self, alphas: list[float], kinds: list[str]) -> list[Variant]:
        """The grid, each variant's planned weights checked against the intended ones."""
        from mergekit_ftt.sweep import build, grid

        recipe = load_recipe(self.args.recipe)
        self.merge_options = build.merge_options(self.options.trust_remote_code)
        self.stages(f"planning the variants of {self.args.recipe} with mergekit")
        self.plan = build.SweepPlan(recipe, self.merge_options)
        if self.plan.note:
            self.stages(self.plan.note)
        names = [task.tensor_name for task in self.plan.base.save_tasks]
        variants = grid.make_variants(recipe, alphas, kinds, names)
        scaled = [str(recipe.models[i].model) for i in scaled_inputs(recipe)]
        for variant in variants:
            self.plan.check_weights(variant, scaled)
        self.recipe = recipe
        return variants

    def write_recipes(self, variants: list[Variant]) -> None:
        """``OUT/recipes/<variant>.yml``; a different recipe under a name already used
        means ``--out`` holds another sweep, which only ``--force`` replaces."""
        texts = {self.recipes / f"{v.label}.yml": v.to_yaml(self.args.recipe) for v in variants}
        changed = [p for p, text in texts.items() if p.exists() and p.read_text("utf-8") != text]
        if changed and not self.run_options.force:
            raise FttError(
                f"{changed[0]} holds another recipe than this sweep's {changed[0].stem}: "
                f"{self.out} is a sweep of another recipe. Choose another --out, or pass "
                "--force to re-run every variant there"
            )
        self.recipes.mkdir(parents=True, exist_ok=True)
        for path, text in texts.items():
            if path in changed:  # --force: the old variant's results go with its recipe
                shutil.rmtree(self.eval_dir / path.stem, ignore_errors=True)
            path.write_text(text, encoding="utf-8")

    # --- building and evaluating ---------------------------------------------------

    def run(self, variants: list[Variant]) -> None:
        from mergekit_ftt.eval import backends
        from mergekit_ftt.sweep import build

        self.hf_args = backends.model_args("hf", "", self.options)
        self.memory = build.memory_plan(
            self.recipe,
            self.merge_options,
            self.args.build,
            self.backend,
            self.hf_args["device"],
            {"float64": 8, "float32": 4}.get(self.hf_args["dtype"], 2),
        )
        self.stages(self.memory.describe())
        shutil.rmtree(self.scratch, ignore_errors=True)  # a variant left by an interrupted run
        reading = (
            build.read_once(self.recipe.referenced_models(), self.merge_options)
            if self.memory.cache_inputs
            else contextlib.nullcontext({})
        )
        with reading as loaders:
            for index, variant in enumerate(variants, 1):
                started = time.monotonic()
                self.build_seconds = None
                self._evaluate(variant)
                shutil.rmtree(self.scratch, ignore_errors=True)
                self._report_variant(index, len(variants), variant, started)
            self.input_reads = {str(m): loader.reads for m, loader in loaders.items()}

    def _build(self, variant: Variant) -> dict:
        """lm-eval model arguments for ``variant``, built when its evaluation needs it."""
        started = time.monotonic()
        loaded = self._build_in_memory(variant) if self.memory.in_memory else self._write(variant)
        self.build_seconds = time.monotonic() - started
        return loaded

    def _build_in_memory(self, variant: Variant) -> dict:
        from mergekit_ftt.sweep import build

        if self.model is None:  # one model for the whole sweep, made when first needed
            files = self.out / "model_files"
            self.plan.write_model_files(files)
            self.model = build.InMemoryModel(
                files, self.hf_args["device"], self.hf_args["dtype"], self.options.trust_remote_code
            )
        self.model.load(self.plan.tensors(variant))
        return {"pretrained": self.model.model, "tokenizer": self.model.tokenizer}

    def _write(self, variant: Variant) -> dict:

        folder = self.scratch / variant.label
        text = (self.recipes / f"{variant.label}.yml").read_text(encoding="utf-8")
        self.plan.write(variant, folder, text)
        return {"pretrained": str(folder)}

    def _evaluate(self, variant: Variant) -> None:
        from mergekit_ftt.eval.runner import ModelSpec, evaluate_models

        run = self.run_options
        recipe = str(self.recipes / f"{variant.label}.yml")
        spec = ModelSpec(variant.label, recipe, load=functools.partial(self._build, variant))
        evaluate_models(
            [spec],
            self.suite,
            self.eval_dir,
            backend=self.backend,
            options=self.options,
            include_path=run.include_path,
            limit=run.limit,
            force=run.force,
        )

    def _report_variant(self, index: int, count: int, variant: Variant, started: float) -> None:
        from mergekit_ftt.eval.report import build_table

        table = build_table([self.eval_dir / variant.label])
        (row,) = table.rows
        scores = ", ".join(f"{c} {table.score(row, c):.1f}" for c in table.columns)
        if self.build_seconds is None:
            self.stages(f"{index}/{count} {variant.label}: evaluated earlier: {scores}")
            return
        total = time.monotonic() - started
        how = "built in memory" if self.memory.in_memory else "written by mergekit"
        self.timings[variant.label] = {"build_s": self.build_seconds, "total_s": total}
        self.stages(
            f"{index}/{count} {variant.label}: {how} in {self.build_seconds:.1f} s, "
            f"evaluated in {total - self.build_seconds:.1f} s: {scores}"
        )

    def record(self, variants: list[Variant], alphas: list[float], kinds: list[str]) -> None:
        """``OUT/sweep.json``: the settings and, for this run, timings and tensor reads."""
        args = self.args
        record = {
            "recipe": str(args.recipe),
            "alphas": alphas,
            "modules": kinds,
            "suite": args.suite,
            "tasks": args.tasks,
            "limit": self.run_options.limit,
            "backend": self.backend,
            "build": self.memory.describe() if hasattr(self, "memory") else None,
            "variants": {v.label: {"kind": v.kind, "alpha": v.alpha} for v in variants},
            "timings_s": self.timings,
            "tensors_read_from_disk": getattr(self, "input_reads", {}),
        }
        (self.out / RUN_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def _negative_alphas_attached(argv: list[str]) -> list[str]:
    """``--alphas -1,1`` as ``--alphas=-1,1``: argparse takes a value that starts with '-'
    and is not a single number for an unknown option."""
    joined = list(argv)
    for index, (flag, value) in enumerate(itertools.pairwise(argv)):
        if flag == "--alphas" and re.fullmatch(r"-[\d.][\d.,\s-]*", value):
            joined[index : index + 2] = [f"--alphas={value}"]
            break
    return joined


def run(argv: Sequence[str] | None = None) -> None:
    argv = _negative_alphas_attached(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(argv)
    alphas = parse_alphas(args.alphas)
    kinds = parse_kinds(args.modules) if args.modules is not None else []
    _check_out(args.out)
    require_writable(args.out, "--out", folder=True)
    stages = Stages(PROG)
    sweep = Sweep(args, stages)
    load_recipe(args.recipe)  # a wrong recipe fails before lm-eval is even imported
    with _removed_unless_recorded(args.out), library_logs(args.out / LOG_FILE, args.verbose):
        stages(f"checking the evaluation: {args.suite or args.tasks}")
        sweep.resolve_evaluation()
        variants = sweep.make_variants(alphas, kinds)
        sweep.write_recipes(variants)
        sweep.record(variants, alphas, kinds)  # from here on, --out holds a sweep
        stages(
            f"{len(variants)} variants: α ∈ {{{', '.join(map(format_alpha, alphas))}}} on all "
            f"tensors{''.join(f', on {k} tensors' for k in kinds)}"
        )
        try:
            sweep.run(variants)
        finally:
            sweep.record(variants, alphas, kinds)
        from mergekit_ftt.sweep.report import collect, to_markdown, write_report

        results = collect(sweep.eval_dir, variants)
        paths = write_report(
            results, args.out / "report", sweep.recipes, title=f"{PROG}: {args.recipe.name}"
        )
    print()
    print(to_markdown(results), end="")
    best = results.best_point()
    if best is not None:
        kind = "all tensors" if best.kind == ALL else f"{best.kind} tensors"
        print(f"\nbest: α = {format_alpha(best.alpha)} on {kind}, mean {best.mean:.1f}")
    for kind, path in paths.items():
        print(f"  {kind}: {path}")
    stages("done")


main = entry_point(PROG)(run)
