"""What the start-up hook costs every Python process of the environment (target ≤ 3 ms).

Two measures, each over fresh interpreters of this environment:

- ``python -X importtime -c pass``: the cumulative import time of ``mergekit_ftt.hook``
  (the ``mergekit_ftt`` package included), as the ``.pth`` line imports it;
- import and ``install()`` timed with ``time.perf_counter`` inside ``python -S`` (no site,
  so nothing else is imported first), the ``.pth`` line's whole work.

Both with the modules' bytecode cached, as an installed package has it (compiled once into
a temporary ``PYTHONPYCACHEPREFIX``: nothing is written into the checkout), and compiled
from source at every start, as under ``PYTHONDONTWRITEBYTECODE=1``.

Usage: ``python benchmarks/hook_startup.py [--runs 21] [--json benchmarks/results/hook_startup.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IN_PROCESS = (
    "import sys, time; sys.path.insert(0, {root!r}); t = time.perf_counter();"
    "import mergekit_ftt.hook as h; h.install(); print((time.perf_counter() - t) * 1e3)"
)


def importtime_ms(env: dict[str, str]) -> float:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True, env=env
    )
    match = re.search(r"\|\s*(\d+) \|\s*mergekit_ftt\.hook$", result.stderr, re.MULTILINE)
    if match is None:
        raise SystemExit("mergekit_ftt.hook was not imported at start-up: is the .pth installed?")
    return int(match.group(1)) / 1e3


def in_process_ms(env: dict[str, str]) -> float:
    code = IN_PROCESS.format(root=str(ROOT))
    run = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env
    )
    return float(run.stdout)


def summary(values: list[float]) -> dict:
    return {
        "median_ms": round(statistics.median(values), 3),
        "min_ms": round(min(values), 3),
        "max_ms": round(max(values), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as prefix:
        cached = {**os.environ, "PYTHONPYCACHEPREFIX": prefix}
        cached.pop("PYTHONDONTWRITEBYTECODE", None)
        compiled = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        in_process_ms(cached)  # writes the bytecode once
        times: dict[str, list[float]] = {}
        for _ in range(args.runs):  # alternating, so that load changes hit all alike
            for name, env in (("cached bytecode", cached), ("compiled at start", compiled)):
                times.setdefault(f"{name}: importtime cumulative", []).append(importtime_ms(env))
                times.setdefault(f"{name}: import and install", []).append(in_process_ms(env))
    result = {
        "runs": args.runs,
        **{name: summary(values) for name, values in times.items()},
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
