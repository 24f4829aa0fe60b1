"""What the benchmark scripts share: where results go and how they are written (the JSON
record, the Markdown page and its common parts), the machine line, the reference.

Every script in benchmarks/ imports from here (or from bench_merge.py, for the merge
measurements), never from tests/.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))
DEFAULT_RESULTS = BENCH_DIR / "results"
GB = 1000**3


def machine_info() -> dict:
    from importlib.metadata import version

    import torch

    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "ram_gb": round(int(meminfo["MemTotal"].split()[0]) * 1024 / GB, 1),
        "available_ram_gb": round(int(meminfo["MemAvailable"].split()[0]) * 1024 / GB, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "mergekit": version("mergekit"),
        "transformers": version("transformers"),
        "safetensors": version("safetensors"),
    }


def result_start(size: str, repeats: int, **fields) -> dict:
    """A results record's first fields: the size, the start, the machine and its load, the
    repeats and the command line; then ``fields``."""
    return {
        "size": size,
        "started_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average_start": os.getloadavg(),
        "repeats": repeats,
        "command": "python " + shlex.join(sys.argv),
        **fields,
    }


def result_stem(results: Path, name: str, started_utc: str, label: str = "") -> Path:
    """``<results>/<name>-<date>-<HHMM>[-label]``: one file pair per benchmark run, so a
    second run on the same day never overwrites the first."""
    stamp = dt.datetime.fromisoformat(started_utc).strftime("%Y-%m-%d-%H%M")
    return results / "-".join(filter(None, [name, stamp, label]))


def write_result(stem: Path, result: dict, page: str) -> None:
    """``stem``.json, the record, and ``stem``.md, its page; the folder is made if missing."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(page)


def machine_line(result: dict) -> str:
    """The results files' line on the machine, its load and the library versions."""
    machine = result["machine"]
    loads = [" / ".join(f"{x:.2f}" for x in result[key]) for key in ("load_average_start", "load_average_end")]  # fmt: skip
    return (
        f"Machine: {machine['cpu_model']}, {machine['cores']} cores, {machine['ram_gb']} GB RAM "
        f"({machine['available_ram_gb']} GB available at start); shared with other jobs, load "
        f"average {loads[0]} at start, {loads[1]} at end (1/5/15 min). torch {machine['torch']} "
        f"({machine['torch_threads']} threads), mergekit {machine['mergekit']}, transformers "
        f"{machine['transformers']}."
    )


def rounded_once(values, dtype, chunk: int = 1 << 24):
    """float64 ``values`` rounded once to ``dtype`` by the NumPy reference, in chunks.

    Not torch's ``.to(torch.bfloat16)``: from float64 it rounds to float32 first, and that
    double rounding differs from one rounding for a few elements in a billion (8 of
    1.48B at 1b). Chunks keep NumPy's temporaries small for the 8B embedding.
    """
    import torch

    from mergekit_ftt.reference import rounded  # independent of the kernel

    flat = values.reshape(-1).numpy()
    parts = [rounded(flat[start : start + chunk], dtype) for start in range(0, flat.size, chunk)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=dtype)


def rates(elements: int, seconds: list[float]) -> dict:
    """Median, min and max of ``elements`` per second, in millions."""
    per_second = sorted(elements / s / 1e6 for s in seconds)
    return {"median": statistics.median(per_second), "min": per_second[0], "max": per_second[-1]}


def page_top(title: str, result: dict, intro: str) -> list[str]:
    """A results page's first lines: "# title: size, start", the machine line, ``intro``."""
    return [f"# {title}: {result['size']}, {result['started_utc']}", "", machine_line(result), "", intro, ""]  # fmt: skip


def variant_rows(summary: dict, label, cells, width: int) -> list[str]:
    """A Markdown table row a variant: its label, then ``cells(variant, row)``; a variant
    that did not run gets ``width`` dashes and its note."""
    lines = []
    for variant, row in summary.items():
        if "wall_s" not in row:
            lines.append(f"| {label(variant)} |" + " – |" * width + f" {row.get('note', '')} |")
        else:
            lines.append("| " + " | ".join([label(variant), *cells(variant, row)]) + " |")
    return lines


def verification_lines(result: dict, label, heading: str) -> list[str]:
    """The page's list of elements that differ from the reference, where it was checked."""
    if "verification" not in result:
        return []
    lines = ["", heading, ""]
    for variant, entry in result["verification"].items():
        lines.append(
            f"- {label(variant)}: {entry['mismatched']:,} of {entry['elements']:,} "
            f"({entry['mismatched'] / entry['elements']:.4%}; max |diff| {entry['max_abs_diff']:.3g})"
        )
    return lines


def command_line(result: dict) -> list[str]:
    """The page's last line: the command that made it."""
    return ["", f"Command: `{result['command']}`"]
