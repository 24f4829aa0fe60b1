"""Time and measure a fine-tuning transfer four ways on checkpoints from make_checkpoints.py.

Variants, run alternately (a b c d, a b c d, ...) in fresh subprocesses:

- ``transfer``: ``mergekit-yaml`` with ``merge_method: finetuning_transfer``;
- ``task_arithmetic``: the same merge as mergekit's ``task_arithmetic`` workaround,
  ``base_model`` = target, weights +1 (fine-tuned) and −1 (source base), ``dtype: float32``,
  ``out_dtype`` = the output dtype, so target + (ft − target) − (sb − target);
- ``full_load``: the paper-style script (``full_load_transfer.py``) that loads all three
  models with transformers, under an address-space cap so it fails with MemoryError
  instead of waking the OOM killer; refused up front when its estimated need exceeds
  the cap;
- ``io_floor``: read every input byte, write one model's bytes (``io_floor.py``).

For each: wall seconds, CPU seconds (user + sys of the process tree), peak RSS of the
process tree (polled, and the kernel's high-water mark of the main process), input GB/s;
medians over ``--repeats``. ``mergekit-yaml --help`` is timed too, so merge work can be
told apart from interpreter and import start-up. With ``--verify`` the outputs of the
first round are compared element by element with a float64 reference
``target + (ft − sb)`` rounded once to the output dtype.

    python benchmarks/make_checkpoints.py 350m
    python benchmarks/bench_merge.py 350m --verify

Writes ``benchmarks/results/<size>-<date>.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_CHECKPOINTS = BENCH_DIR / "checkpoints"
DEFAULT_RESULTS = BENCH_DIR / "results"
GB = 1000**3
VARIANTS = ("transfer", "task_arithmetic", "full_load", "io_floor")
LABELS = {
    "transfer": "(a) finetuning_transfer",
    "task_arithmetic": "(b) task_arithmetic ±1, float32",
    "full_load": "(c) paper-style full load",
    "io_floor": "(d) I/O floor",
    "startup": "mergekit-yaml --help (start-up)",
}
POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Inputs:
    """The three checkpoints of one size."""

    target: Path
    source_finetuned: Path
    source_base: Path

    @classmethod
    def for_size(cls, checkpoints: Path, size: str) -> Inputs:
        root = checkpoints / size
        inputs = cls(root / "target", root / "source_finetuned", root / "source_base")
        missing = [str(p) for p in asdict(inputs).values() if not (p / "config.json").exists()]
        if missing:
            raise SystemExit(
                f"missing checkpoints {missing}; run "
                f"`python benchmarks/make_checkpoints.py {size} --out {checkpoints}` first"
            )
        return inputs

    def weight_bytes(self, path: Path) -> int:
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))

    @property
    def total_bytes(self) -> int:
        return sum(self.weight_bytes(p) for p in asdict(self).values())


def transfer_config(inputs: Inputs, dtype: str = "bfloat16") -> dict:
    """``finetuning_transfer``: target + 1.0 · (source_finetuned − source_base)."""
    return {
        "merge_method": "finetuning_transfer",
        "base_model": str(inputs.target),
        "dtype": dtype,
        "models": [
            {
                "model": str(inputs.source_finetuned),
                "parameters": {"role": "source_finetuned", "weight": 1.0},
            },
            {"model": str(inputs.source_base), "parameters": {"role": "source_base"}},
        ],
    }


def task_arithmetic_config(inputs: Inputs, out_dtype: str = "bfloat16") -> dict:
    """The same merge as ``task_arithmetic``.

    task_arithmetic measures every delta against ``base_model`` (the target here), so
    weights +1 / −1 give target + (ft − target) − (sb − target) = target + ft − sb.
    ``dtype: float32`` is the computation dtype (bf16 arithmetic mis-rounds ~20% of
    elements); ``out_dtype`` keeps the output in the input dtype, else mergekit writes
    float32 and twice the bytes.
    """
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(inputs.target),
        "dtype": "float32",
        "out_dtype": out_dtype,
        "models": [
            {"model": str(inputs.source_finetuned), "parameters": {"weight": 1.0}},
            {"model": str(inputs.source_base), "parameters": {"weight": -1.0}},
        ],
    }


@dataclass
class Run:
    """One measured subprocess run."""

    variant: str
    wall_s: float
    cpu_s: float
    peak_rss_bytes: int
    peak_anon_bytes: int
    returncode: int
    note: str = ""


@dataclass
class Settings:
    size: str
    inputs: Inputs
    workdir: Path
    repeats: int
    variants: tuple[str, ...]
    mergekit_args: tuple[str, ...]
    memory_cap_bytes: int
    verify: bool
    results: Path = DEFAULT_RESULTS
    env: dict = field(default_factory=dict)


def mergekit_command(config_path: Path, output: Path, mergekit_args) -> list[str]:
    return ["mergekit-yaml", str(config_path), str(output), "--quiet", *mergekit_args]


def variant_command(variant: str, settings: Settings, output: Path) -> list[str]:
    inputs = settings.inputs
    if variant in ("transfer", "task_arithmetic"):
        return mergekit_command(settings.workdir / f"{variant}.yml", output, settings.mergekit_args)
    if variant == "full_load":
        return [
            sys.executable,
            str(BENCH_DIR / "full_load_transfer.py"),
            "--target", str(inputs.target),
            "--source-finetuned", str(inputs.source_finetuned),
            "--source-base", str(inputs.source_base),
            "--output", str(output),
        ]  # fmt: skip
    if variant == "io_floor":
        return [
            sys.executable,
            str(BENCH_DIR / "io_floor.py"),
            "--inputs", str(inputs.source_finetuned), str(inputs.source_base),
            "--target", str(inputs.target),
            "--output", str(output),
        ]  # fmt: skip
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


def write_configs(settings: Settings) -> None:
    settings.workdir.mkdir(parents=True, exist_ok=True)
    for name, config in (
        ("transfer", transfer_config(settings.inputs)),
        ("task_arithmetic", task_arithmetic_config(settings.inputs)),
    ):
        (settings.workdir / f"{name}.yml").write_text(yaml.safe_dump(config, sort_keys=False))


def full_load_need_bytes(inputs: Inputs) -> int:
    """Rough RAM need of the full-load script: three bf16 models + float64 scratch."""
    from safetensors import safe_open

    largest = 0
    for shard in inputs.target.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                shape = handle.get_slice(name).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                largest = max(largest, count)
    return inputs.total_bytes + 3 * 8 * largest + GB  # + interpreter, torch, transformers


class TreeSampler(threading.Thread):
    """Polls the memory of a process and its descendants until stopped.

    ``peak`` is the larger of the summed RSS of the tree at any poll and the kernel's
    high-water mark (VmHWM) of any one process, which catches spikes between polls.
    ``peak_anon`` counts anonymous memory only (RssAnon): safetensors maps input shards,
    and the pages a merge has read count as (file-backed, reclaimable) RSS until the
    shard is closed. A child is only counted once it has exec'd: before that it is a
    copy of this process.
    """

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.peak_anon = 0
        self._done = threading.Event()

    def run(self) -> None:
        import psutil

        own_cmdline = psutil.Process().cmdline()
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._done.is_set():
            total = anon = 0
            try:
                for process in [root, *root.children(recursive=True)]:
                    if process.cmdline() == own_cmdline:
                        continue
                    status = _memory_status(process.pid)
                    total += status.get("VmRSS", 0)
                    anon += status.get("RssAnon", 0)
                    self.peak = max(self.peak, status.get("VmHWM", 0))
            except psutil.Error:
                pass
            self.peak = max(self.peak, total)
            self.peak_anon = max(self.peak_anon, anon)
            self._done.wait(POLL_SECONDS)

    def stop(self) -> tuple[int, int]:
        self._done.set()
        self.join()
        return self.peak, self.peak_anon


def _memory_status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, VmHWM, ... of a process in bytes (empty once it has gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {
        key: int(value.split()[0]) * 1024
        for key, value in (line.split(":", 1) for line in lines)
        if value.strip().endswith("kB")
    }


def measure(
    variant: str, command: list[str], env: dict, log: Path, memory_cap: int | None = None
) -> Run:
    """Run ``command`` to completion; wall, CPU and peak RSS of its process tree."""

    def cap_address_space():  # runs in the child: MemoryError instead of the OOM killer
        resource.setrlimit(resource.RLIMIT_AS, (memory_cap, memory_cap))

    with open(log, "wb") as output:
        start = time.perf_counter()
        process = subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=cap_address_space if memory_cap else None,
        )
        sampler = TreeSampler(process.pid)
        sampler.start()
        # wait4 gives the rusage of the child and all descendants it waited for.
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
    # Not ru_maxrss: after a vfork it includes this (parent) process's own RSS.
    peak, peak_anon = sampler.stop()
    note = ""
    if process.returncode:
        tail = log.read_text(errors="replace")[-2000:]
        note = "out of memory" if "MemoryError" in tail or "alloc" in tail else "failed"
        note += f" (exit {process.returncode}, see {log})"
    cpu = usage.ru_utime + usage.ru_stime
    return Run(variant, wall, cpu, peak, peak_anon, process.returncode, note)


def run_variant(variant: str, settings: Settings, round_index: int) -> Run:
    output = settings.workdir / f"out-{variant}"
    shutil.rmtree(output, ignore_errors=True)
    cap = settings.memory_cap_bytes if variant == "full_load" else None
    if variant == "full_load":
        need = full_load_need_bytes(settings.inputs)
        if need > cap:
            return Run(
                variant, float("nan"), float("nan"), 0, 0, -1,
                f"not run: needs ≈ {need / GB:.0f} GB, cap {cap / GB:.0f} GB",
            )  # fmt: skip
    log = settings.workdir / f"{variant}-{round_index}.log"
    run = measure(variant, variant_command(variant, settings, output), settings.env, log, cap)
    if run.returncode and variant == "full_load":
        run.note = run.note.replace("out of memory", f"out of memory at {cap / GB:.0f} GB cap")
    return run


def startup_run(settings: Settings, round_index: int) -> Run:
    log = settings.workdir / f"startup-{round_index}.log"
    return measure("startup", ["mergekit-yaml", "--help"], settings.env, log)


def verify_outputs(settings: Settings, variants) -> dict[str, dict]:
    """Compare each variant's output with float64 target + (ft − sb), rounded once."""
    from safetensors import safe_open

    def open_model(path: Path) -> dict:
        index_file = path / "model.safetensors.index.json"
        if index_file.exists():
            weight_map = json.loads(index_file.read_text())["weight_map"]
        else:
            with safe_open(path / "model.safetensors", framework="pt") as handle:
                weight_map = dict.fromkeys(handle.keys(), "model.safetensors")
        return {name: path / shard for name, shard in weight_map.items()}

    def load(files: dict, name: str):
        with safe_open(files[name], framework="pt") as handle:
            return handle.get_tensor(name)

    inputs = settings.inputs
    target, ft, sb = (
        open_model(p) for p in (inputs.target, inputs.source_finetuned, inputs.source_base)
    )
    outputs = {v: open_model(settings.workdir / f"out-{v}") for v in variants}
    report = {v: {"elements": 0, "mismatched": 0, "max_abs_diff": 0.0} for v in variants}
    for name in target:
        t = load(target, name)
        reference = (t.double() + (load(ft, name).double() - load(sb, name).double())).to(t.dtype)
        for variant, files in outputs.items():
            if name not in files:
                raise RuntimeError(f"{variant} output lacks tensor {name}")
            got = load(files, name)
            if got.dtype != reference.dtype or got.shape != reference.shape:
                raise RuntimeError(f"{variant}: {name} is {got.dtype} {tuple(got.shape)}")
            differs = got != reference
            entry = report[variant]
            entry["elements"] += reference.numel()
            entry["mismatched"] += int(differs.sum())
            if differs.any():
                diff = (got.double() - reference.double()).abs().max().item()
                entry["max_abs_diff"] = max(entry["max_abs_diff"], diff)
    return report


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


def summarize(runs: list[Run], input_bytes: int) -> dict:
    done = [r for r in runs if r.returncode == 0]
    if not done:
        return {"runs": len(runs), "ok": 0, "note": runs[0].note if runs else ""}
    wall = statistics.median(r.wall_s for r in done)
    return {
        "runs": len(runs),
        "ok": len(done),
        "wall_s": wall,
        "cpu_s": statistics.median(r.cpu_s for r in done),
        "peak_rss_gb": statistics.median(r.peak_rss_bytes for r in done) / GB,
        "peak_anon_gb": statistics.median(r.peak_anon_bytes for r in done) / GB,
        "input_gb_per_s": input_bytes / GB / wall,
        "note": next((r.note for r in runs if r.note), ""),
    }


def markdown_table(summary: dict, startup_s: float) -> str:
    floor = summary.get("io_floor", {}).get("wall_s")
    ta = summary.get("task_arithmetic", {}).get("wall_s")
    lines = [
        "| variant | wall s | CPU s | peak RSS GB | of it anonymous GB | input GB/s | merge work s | work ÷ floor | wall ÷ task_arithmetic | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, row in summary.items():
        if "wall_s" not in row:
            lines.append(f"| {LABELS[variant]} | – | – | – | – | – | – | – | – | {row['note']} |")
            continue
        is_mergekit = variant in ("transfer", "task_arithmetic")
        work = row["wall_s"] - startup_s if is_mergekit else row["wall_s"]
        lines.append(
            f"| {LABELS[variant]} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | "
            f"{row['peak_rss_gb']:.2f} | {row['peak_anon_gb']:.2f} | "
            + (f"{row['input_gb_per_s']:.2f} | " if variant != "startup" else "– | ")
            + (f"{work:.1f} | " if variant != "startup" else "– | ")
            + (
                f"{work / floor:.2f} | "
                if floor and variant not in ("startup", "io_floor")
                else "– | "
            )
            + (f"{row['wall_s'] / ta:.2f} | " if ta and is_mergekit else "– | ")
            + f"{row['note']} |"
        )
    return "\n".join(lines)


def run_benchmark(settings: Settings) -> dict:
    write_configs(settings)
    input_bytes = settings.inputs.total_bytes
    started = dt.datetime.now(dt.timezone.utc)
    result = {
        "size": settings.size,
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average_start": os.getloadavg(),
        "input_bytes": input_bytes,
        "output_bytes": settings.inputs.weight_bytes(settings.inputs.target),
        "repeats": settings.repeats,
        "command": "python " + shlex.join(sys.argv),
        "mergekit_args": list(settings.mergekit_args),
        "configs": {
            "transfer": transfer_config(settings.inputs),
            "task_arithmetic": task_arithmetic_config(settings.inputs),
        },
        "runs": [],
    }
    runs: dict[str, list[Run]] = {v: [] for v in ("startup", *settings.variants)}
    for round_index in range(settings.repeats):
        runs["startup"].append(startup_run(settings, round_index))
        for variant in settings.variants:
            run = run_variant(variant, settings, round_index)
            runs[variant].append(run)
            print(f"round {round_index + 1}: {variant}: {run.wall_s:.1f} s, "
                  f"{run.peak_rss_bytes / GB:.2f} GB {run.note}", flush=True)  # fmt: skip
            _record(result, runs, input_bytes, settings)  # a stopped run keeps what it measured
            if not (settings.verify and round_index == 0):  # an 8B output is 16 GB of disk
                shutil.rmtree(settings.workdir / f"out-{variant}", ignore_errors=True)
        if round_index == 0 and settings.verify:
            verified = [
                v for v in settings.variants if v != "io_floor" and runs[v][0].returncode == 0
            ]
            result["verification"] = verify_outputs(settings, verified)
        for variant in settings.variants:
            shutil.rmtree(settings.workdir / f"out-{variant}", ignore_errors=True)
    _record(result, runs, input_bytes, settings)
    return result


def _record(result: dict, runs: dict[str, list[Run]], input_bytes: int, settings: Settings) -> None:
    """Update ``result`` with the runs so far and write it as JSON and Markdown."""
    result["load_average_end"] = os.getloadavg()
    result["runs"] = [asdict(r) for rs in runs.values() for r in rs]
    result["summary"] = {v: summarize(rs, input_bytes) for v, rs in runs.items() if rs}
    settings.results.mkdir(parents=True, exist_ok=True)
    stem = settings.results / f"{settings.size}-{result['started_utc'][:10]}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(render_markdown(result))


def render_markdown(result: dict) -> str:
    machine = result["machine"]
    startup = result["summary"]["startup"].get("wall_s", 0.0)
    parts = [
        f"# Merge benchmark: {result['size']}, {result['started_utc']}",
        "",
        f"Machine: {machine['cpu_model']}, {machine['cores']} cores, {machine['ram_gb']} GB RAM "
        f"({machine['available_ram_gb']} GB available at start); shared with other jobs, load "
        f"average {' / '.join(f'{x:.2f}' for x in result['load_average_start'])} at start, "
        f"{' / '.join(f'{x:.2f}' for x in result['load_average_end'])} at end (1/5/15 min). "
        f"torch {machine['torch']} ({machine['torch_threads']} threads), mergekit "
        f"{machine['mergekit']}, transformers {machine['transformers']}.",
        "",
        f"Inputs {result['input_bytes'] / GB:.2f} GB (three checkpoints), output "
        f"{result['output_bytes'] / GB:.2f} GB. Median of {result['repeats']} alternating runs, "
        "each in a fresh process. Merge work = wall − mergekit start-up; floor = (d).",
        "",
        markdown_table(result["summary"], startup),
        "",
        f"Command: `{result['command']}`",
    ]
    if "verification" in result:
        parts += ["", "Elements that differ from float64 `target + (ft − sb)` rounded once:", ""]
        for variant, entry in result["verification"].items():
            parts.append(
                f"- {LABELS[variant]}: {entry['mismatched']} of {entry['elements']} "
                f"(max |diff| {entry['max_abs_diff']:.3g})"
            )
    return "\n".join(parts) + "\n"


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "size", help="a size written by make_checkpoints.py (tiny, 350m, 1b, llama3-8b)"
    )
    parser.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument(
        "--workdir", type=Path, help="outputs and logs (default: <checkpoints>/<size>/bench)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of %(default)s"
    )
    parser.add_argument(
        "--memory-cap-gb", type=float,
        help="address-space cap for full_load (default: RAM available at start − 2 GB)",
    )  # fmt: skip
    parser.add_argument("--verify", action="store_true", help="check outputs against float64")
    parser.add_argument(
        "--mergekit-args", default="",
        help="extra mergekit-yaml options for (a) and (b), e.g. '--out-shard-size 1B'",
    )  # fmt: skip
    args = parser.parse_args(argv)
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    cap = args.memory_cap_gb * GB if args.memory_cap_gb else _available_ram() - 2 * GB
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return Settings(
        size=args.size,
        inputs=Inputs.for_size(args.checkpoints, args.size),
        workdir=args.workdir or args.checkpoints / args.size / "bench",
        repeats=args.repeats,
        variants=variants,
        mergekit_args=tuple(args.mergekit_args.split()),
        memory_cap_bytes=int(cap),
        verify=args.verify,
        results=args.results,
        env=env,
    )


def _available_ram() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    result = run_benchmark(settings)
    print(render_markdown(result))
    print(f"wrote {settings.results / settings.size}-{result['started_utc'][:10]}.md and .json")


if __name__ == "__main__":
    main()
