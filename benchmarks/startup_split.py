"""Where a small merge's wall time goes: start-up (mergekit's and the plugin's) vs merging.

Runs ``mergekit-yaml CONFIG OUT`` in a fresh interpreter with timers around the phases of
mergekit's ``run_merge`` and of the plugin's wrapper, and reports each phase's median
seconds over ``--repeats`` runs and its share of the whole process's wall time:

- interpreter start and exit (before the command's first line and after its last;
  includes the plugin's ``.pth`` start-up hook),
- imports (mergekit, transformers, torch) and the plugin's registration of its method,
- the plugin's preflight and generation-config copy,
- mergekit's setup (architecture, loader warm-up, planning, schedule),
- the merge itself (mergekit's executor: load, merge, write),
- mergekit's finish (config, tokenizer, model card) and everything else.

    python benchmarks/startup_split.py benchmarks/checkpoints/350m/bench/transfer.yml

Writes ``benchmarks/results/startup-<date>.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent

# Runs in the child: time the phases, then run mergekit-yaml's own entry point.
CHILD = r"""
import json, sys, time
started = time.perf_counter()
spent = {}
import mergekit_ftt.hook  # imported by the .pth hook already

import mergekit_ftt.mergekit_adapter
registration = mergekit_ftt.mergekit_adapter.register
def timed_registration():
    start = time.perf_counter()
    registration()
    spent["plugin: method registration"] = time.perf_counter() - start
mergekit_ftt.mergekit_adapter.register = timed_registration
import mergekit.scripts.run_yaml as run_yaml  # mergekit, transformers, torch; the plugin registers
imported = time.perf_counter()
import mergekit.merge, mergekit.plan, mergekit.graph, mergekit_ftt.outputs, mergekit_ftt.preflight

def timed(owner, name, label):
    function = getattr(owner, name)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - start
    setattr(owner, name, wrapper)

def timed_iteration(owner, name, label):
    function = getattr(owner, name)
    def wrapper(*args, **kwargs):
        iterator = function(*args, **kwargs)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - start
            yield item
    setattr(owner, name, wrapper)

timed(mergekit_ftt.preflight, "check_merge", "plugin: preflight")
timed(mergekit_ftt.outputs, "finish_output", "plugin: card and generation config")
timed(mergekit.merge, "get_architecture_info", "mergekit: setup")
timed(mergekit.merge.LoaderCache, "setup", "mergekit: setup")
timed(mergekit.plan.MergePlanner, "plan_to_disk", "mergekit: setup")
timed(mergekit.graph.Executor, "__init__", "mergekit: setup")
timed_iteration(mergekit.graph.Executor, "run", "merge: load, merge, write")
try:
    run_yaml.main(sys.argv[2:], standalone_mode=False)
finally:
    spent["imports (mergekit, transformers, torch)"] = (
        imported - started - spent.get("plugin: method registration", 0.0)
    )
    spent["command total"] = time.perf_counter() - started
    with open(sys.argv[1], "w") as file:
        json.dump(spent, file)
"""

ORDER = [
    "interpreter start and exit (incl. the plugin's .pth hook)",
    "imports (mergekit, transformers, torch)",
    "plugin: method registration",
    "plugin: preflight",
    "mergekit: setup",
    "merge: load, merge, write",
    "plugin: generation config",
    "mergekit: finish (config, tokenizer, card) and other",
]


def one_run(config: Path, mergekit_args: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as scratch:
        timings_file = Path(scratch) / "timings.json"
        output = Path(scratch) / "out"
        command = [sys.executable, "-c", CHILD, str(timings_file), str(config), str(output)]
        start = time.perf_counter()
        subprocess.run([*command, "--quiet", *mergekit_args], check=True)
        wall = time.perf_counter() - start
        spent = json.loads(timings_file.read_text())
        shutil.rmtree(output, ignore_errors=True)
    spent[ORDER[0]] = wall - spent.pop("command total")
    spent[ORDER[-1]] = wall - sum(spent.values())
    spent["wall"] = wall
    return spent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="a finetuning_transfer recipe")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mergekit-args", default="", help="extra mergekit-yaml options")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--label", default="", help="appended to the result file name")
    args = parser.parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc)
    load_start = os.getloadavg()
    runs = [one_run(args.config, args.mergekit_args.split()) for _ in range(args.repeats)]
    load_end = os.getloadavg()
    median = {key: statistics.median(run[key] for run in runs) for key in [*ORDER, "wall"]}
    spread = {key: (min(r[key] for r in runs), max(r[key] for r in runs)) for key in median}
    lines = [
        f"# Start-up split of a merge, {started.isoformat(timespec='seconds')}",
        "",
        f"Recipe `{args.config}`, `mergekit-yaml --quiet {args.mergekit_args}`; median "
        f"(min–max) of {args.repeats} runs; load average (1 min) {load_start[0]:.1f} → "
        f"{load_end[0]:.1f} on {os.cpu_count()} cores.",
        "",
        "| phase | seconds | share of wall |",
        "|---|---|---|",
    ]
    for key in [*ORDER, "wall"]:
        low, high = spread[key]
        lines.append(
            f"| {key} | {median[key]:.2f} ({low:.2f}–{high:.2f}) | "
            f"{median[key] / median['wall'] * 100:.0f}% |"
        )
    lines += ["", f"Command: `python {' '.join(sys.argv)}`"]
    result = {
        "started_utc": started.isoformat(timespec="seconds"),
        "config": str(args.config),
        "mergekit_args": args.mergekit_args,
        "load_average_start": load_start,
        "load_average_end": load_end,
        "runs": runs,
        "median": median,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"startup-{started:%Y-%m-%d-%H%M}{args.label}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
