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
process tree (polled, and the kernel's high-water mark of the main process) and its
anonymous part, input GB/s, bytes read from storage, where the main thread was (running
or waiting for a core, waiting for the disk, waiting otherwise), the load average and
the fraction of the inputs in the page cache when the run started; medians and ranges
over ``--repeats``. ``--cache cold`` drops the inputs from the page cache before each
run (``warm`` reads them in), for checkpoints smaller than the RAM. ``--transfer-setting
LABEL=ARGS`` adds transfer variants with other mergekit options or environment
variables. ``mergekit-yaml --help`` is timed too, so merge work can be told apart from
interpreter and import start-up. With ``--verify`` the outputs of the first round are
compared element by element with a float64 reference ``target + (ft − sb)`` rounded
once to the output dtype.

    python benchmarks/make_checkpoints.py 350m
    python benchmarks/bench_merge.py 350m --verify

Writes ``benchmarks/results/<size>-<date>-<HHMM>[-<label>].{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
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
from harness import (
    BENCH_DIR,
    DEFAULT_RESULTS,
    GB,
    REPO,
    command_line,
    page_top,
    result_start,
    result_stem,
    rounded_once,
    variant_rows,
    verification_lines,
    write_result,
)

DEFAULT_CHECKPOINTS = BENCH_DIR / "checkpoints"
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
    def shards(self) -> list[Path]:
        return sorted(f for p in asdict(self).values() for f in Path(p).glob("*.safetensors"))

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
    load_average: float = float("nan")  # 1 min, when the run started
    resident_input_fraction: float | None = None  # of the input bytes, in the page cache
    read_gb: float = 0.0  # read from storage by the process tree (page cache misses)
    written_gb: float = 0.0
    # Where the main thread was, sampled: R running or waiting for a core, D waiting for
    # the disk (page faults on the mapped inputs, writeback throttling), S other waits.
    main_thread_states: dict = field(default_factory=dict)
    main_thread_cpu_s: float = float("nan")


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
    cache: str = "as-found"
    transfer_settings: dict = field(default_factory=dict)  # label -> (env, mergekit args)
    label: str = ""


def mergekit_command(config_path: Path, output: Path, mergekit_args) -> list[str]:
    return ["mergekit-yaml", str(config_path), str(output), "--quiet", *mergekit_args]


def variant_command(variant: str, settings: Settings, output: Path) -> list[str]:
    inputs = settings.inputs
    if variant in settings.transfer_settings:
        _, extra_args = settings.transfer_settings[variant]
        return mergekit_command(
            settings.workdir / "transfer.yml", output, [*settings.mergekit_args, *extra_args]
        )
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
    """Polls the memory, I/O and main-thread state of a process tree until stopped.

    ``peak`` is the larger of the summed RSS of the tree at any poll and the kernel's
    high-water mark (VmHWM) of any one process, which catches spikes between polls.
    ``peak_anon`` counts anonymous memory only (RssAnon): safetensors maps input shards,
    and the pages a merge has read count as (file-backed, reclaimable) RSS until the
    shard is closed. ``read_bytes``/``written_bytes`` are the storage I/O of the tree
    (``/proc/PID/io``, last value seen per process). ``states`` counts the polls that
    found the root's main thread running or runnable (R), in uninterruptible sleep (D:
    waiting for the disk) or sleeping (S). A child is only counted once it has exec'd:
    before that it is a copy of this process.
    """

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.peak_anon = 0
        self.states: dict[str, int] = {}
        self.main_thread_cpu_s = float("nan")
        self._io: dict[int, tuple[int, int]] = {}
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
                    self._io[process.pid] = _storage_io(process.pid) or self._io.get(
                        process.pid, (0, 0)
                    )
                self._sample_main_thread()
            except psutil.Error:
                pass
            self.peak = max(self.peak, total)
            self.peak_anon = max(self.peak_anon, anon)
            self._done.wait(POLL_SECONDS)

    def _sample_main_thread(self) -> None:
        try:
            fields = Path(f"/proc/{self.pid}/task/{self.pid}/stat").read_text()
        except OSError:
            return
        # After the command name (in parentheses): state, ..., utime (14th), stime (15th).
        after_name = fields.rsplit(")", 1)[1].split()
        self.states[after_name[0]] = self.states.get(after_name[0], 0) + 1
        ticks = os.sysconf("SC_CLK_TCK")
        self.main_thread_cpu_s = (int(after_name[11]) + int(after_name[12])) / ticks

    @property
    def read_bytes(self) -> int:
        return sum(read for read, _ in self._io.values())

    @property
    def written_bytes(self) -> int:
        return sum(written for _, written in self._io.values())

    def state_fractions(self) -> dict[str, float]:
        polls = sum(self.states.values())
        groups = {"R": "R", "D": "D", "S": "S", "I": "D"}  # idle kernel waits count as D
        fractions: dict[str, float] = {}
        for state, count in self.states.items():
            key = groups.get(state, "other")
            fractions[key] = fractions.get(key, 0.0) + count / polls
        return fractions

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


def _storage_io(pid: int) -> tuple[int, int] | None:
    """(bytes read from, bytes written to storage) by a process so far; None once gone."""
    try:
        fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    except OSError:
        return None
    return int(fields["read_bytes"]), int(fields["write_bytes"])


def resident_fraction(paths: list[Path]) -> float | None:
    """The fraction of the files' bytes in the page cache (Linux ``mincore``), or None."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
        libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    except (OSError, AttributeError):
        return None
    page = mmap.PAGESIZE
    resident = total = 0
    for path in paths:
        size = path.stat().st_size
        if not size:
            continue
        with open(path, "rb") as file:
            address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, file.fileno(), 0)
        if address in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            pages = ctypes.create_string_buffer((size + page - 1) // page)
            if libc.mincore(address, size, pages) != 0:
                return None
            raw = pages.raw
            resident += (len(raw) - raw.count(0)) * page  # bit 0 set: resident
            total += size
        finally:
            libc.munmap(address, size)
    return min(1.0, resident / total) if total else None


def set_cache(paths: list[Path], cache: str) -> None:
    """Put the files in the page cache (``warm``), out of it (``cold``), or leave them."""
    for path in paths:
        with open(path, "rb", buffering=0) as file:
            if cache == "cold":
                os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            elif cache == "warm":
                buffer = bytearray(64 * 1024 * 1024)
                while file.readinto(buffer):
                    pass


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
    return Run(
        variant,
        wall,
        cpu,
        peak,
        peak_anon,
        process.returncode,
        note,
        read_gb=sampler.read_bytes / GB,
        written_gb=sampler.written_bytes / GB,
        main_thread_states=sampler.state_fractions(),
        main_thread_cpu_s=sampler.main_thread_cpu_s,
    )


def output_folder(settings: Settings, variant: str) -> Path:
    return settings.workdir / f"out-{variant.replace(' ', '-')}"


def run_variant(variant: str, settings: Settings, round_index: int) -> Run:
    output = output_folder(settings, variant)
    shutil.rmtree(output, ignore_errors=True)
    cap = settings.memory_cap_bytes if variant == "full_load" else None
    if variant == "full_load":
        need = full_load_need_bytes(settings.inputs)
        if need > cap:
            return Run(
                variant, float("nan"), float("nan"), 0, 0, -1,
                f"not run: needs ≈ {need / GB:.0f} GB, cap {cap / GB:.0f} GB",
            )  # fmt: skip
    log = settings.workdir / f"{variant.replace(' ', '_')}-{round_index}.log"
    shards = settings.inputs.shards
    set_cache(shards, settings.cache)
    resident = resident_fraction(shards)
    load = os.getloadavg()[0]
    env = {**settings.env, **settings.transfer_settings.get(variant, ({}, ()))[0]}
    run = measure(variant, variant_command(variant, settings, output), env, log, cap)
    run.load_average, run.resident_input_fraction = load, resident
    if run.returncode and variant == "full_load":
        run.note = run.note.replace("out of memory", f"out of memory at {cap / GB:.0f} GB cap")
    return run


def startup_run(settings: Settings, round_index: int) -> Run:
    log = settings.workdir / f"startup-{round_index}.log"
    load = os.getloadavg()[0]
    run = measure("startup", ["mergekit-yaml", "--help"], settings.env, log)
    run.load_average = load
    return run


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
    outputs = {v: open_model(output_folder(settings, v)) for v in variants}
    report = {v: {"elements": 0, "mismatched": 0, "max_abs_diff": 0.0} for v in variants}
    for name in target:
        t = load(target, name)
        exact = t.double() + (load(ft, name).double() - load(sb, name).double())
        reference = rounded_once(exact, t.dtype).reshape(t.shape)
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


def summarize(runs: list[Run], input_bytes: int) -> dict:
    done = [r for r in runs if r.returncode == 0]
    if not done:
        return {"runs": len(runs), "ok": 0, "note": runs[0].note if runs else ""}
    wall = statistics.median(r.wall_s for r in done)

    def spread(values: list[float]) -> list[float]:
        return [min(values), max(values)]

    states = {
        key: statistics.median(r.main_thread_states.get(key, 0.0) for r in done)
        for key in ("R", "D", "S")
    }
    resident = [r.resident_input_fraction for r in done if r.resident_input_fraction is not None]
    return {
        "runs": len(runs),
        "ok": len(done),
        "wall_s": wall,
        "wall_s_range": spread([r.wall_s for r in done]),
        "cpu_s": statistics.median(r.cpu_s for r in done),
        "cpu_s_range": spread([r.cpu_s for r in done]),
        "peak_rss_gb": statistics.median(r.peak_rss_bytes for r in done) / GB,
        "peak_anon_gb": statistics.median(r.peak_anon_bytes for r in done) / GB,
        "peak_anon_gb_range": spread([r.peak_anon_bytes / GB for r in done]),
        "input_gb_per_s": input_bytes / GB / wall,
        "read_gb": statistics.median(r.read_gb for r in done),
        "resident_input_fraction": statistics.median(resident) if resident else None,
        "main_thread_states": states,
        "load_average": spread([r.load_average for r in done]),
        "note": next((r.note for r in runs if r.note), ""),
    }


def label(variant: str) -> str:
    return LABELS.get(variant) or f"{LABELS['transfer']}, {variant.removeprefix('transfer ')}"


def is_mergekit(variant: str) -> bool:
    return variant in ("transfer", "task_arithmetic") or variant.startswith("transfer ")


def markdown_table(summary: dict, startup_s: float) -> str:
    floor = summary.get("io_floor", {}).get("wall_s")
    ta = summary.get("task_arithmetic", {}).get("wall_s")
    lines = [
        "| variant | wall s | CPU s | peak RSS GB (anonymous) | input GB/s | wall ÷ floor "
        "| merge work ÷ floor | wall ÷ task_arithmetic | read from disk GB | main thread R / D / S "
        "| load | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cells(variant: str, row: dict) -> list[str]:
        work = row["wall_s"] - startup_s if is_mergekit(variant) else row["wall_s"]
        compared = floor and variant not in ("startup", "io_floor")
        states = row.get("main_thread_states", {})
        low, high = row["wall_s_range"]
        anon_low, anon_high = row["peak_anon_gb_range"]
        return [
            f"{row['wall_s']:.1f} ({low:.1f}–{high:.1f})",
            f"{row['cpu_s']:.1f}",
            f"{row['peak_rss_gb']:.2f} ({row['peak_anon_gb']:.2f}; {anon_low:.2f}–{anon_high:.2f})",
            "–" if variant == "startup" else f"{row['input_gb_per_s']:.2f}",
            f"{row['wall_s'] / floor:.2f}" if compared else "–",
            f"{work / floor:.2f}" if compared and is_mergekit(variant) else "–",
            f"{row['wall_s'] / ta:.2f}" if ta and is_mergekit(variant) else "–",
            f"{row['read_gb']:.1f}",
            " / ".join(f"{states.get(key, 0) * 100:.0f}%" for key in "RDS"),
            "–".join(f"{x:.1f}" for x in row["load_average"]) if "load_average" in row else "–",
            row["note"],
        ]

    return "\n".join(lines + variant_rows(summary, label, cells, width=10))


def run_benchmark(settings: Settings) -> dict:
    write_configs(settings)
    input_bytes = settings.inputs.total_bytes
    result = result_start(
        settings.size,
        settings.repeats,
        input_bytes=input_bytes,
        output_bytes=settings.inputs.weight_bytes(settings.inputs.target),
        mergekit_args=list(settings.mergekit_args),
        transfer_settings={
            name: {"env": env, "mergekit_args": list(args)}
            for name, (env, args) in settings.transfer_settings.items()
        },
        cache=settings.cache,
        configs={
            "transfer": transfer_config(settings.inputs),
            "task_arithmetic": task_arithmetic_config(settings.inputs),
        },
        runs=[],
    )
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
                shutil.rmtree(output_folder(settings, variant), ignore_errors=True)
        if round_index == 0 and settings.verify:
            verified = [
                v for v in settings.variants if v != "io_floor" and runs[v][0].returncode == 0
            ]
            result["verification"] = verify_outputs(settings, verified)
        for variant in settings.variants:
            shutil.rmtree(output_folder(settings, variant), ignore_errors=True)
    _record(result, runs, input_bytes, settings)
    return result


def _record(result: dict, runs: dict[str, list[Run]], input_bytes: int, settings: Settings) -> None:
    """Update ``result`` with the runs so far and write it as JSON and Markdown."""
    result["load_average_end"] = os.getloadavg()
    result["runs"] = [asdict(r) for rs in runs.values() for r in rs]
    result["summary"] = {v: summarize(rs, input_bytes) for v, rs in runs.items() if rs}
    write_result(
        result_stem(settings.results, settings.size, result["started_utc"], settings.label),
        result,
        render_markdown(result),
    )


CACHE_NOTES = {
    "cold": "inputs dropped from the page cache before each run (posix_fadvise DONTNEED)",
    "warm": "inputs read into the page cache before each run",
    "as-found": "page cache left as the previous run left it",
}


def render_markdown(result: dict) -> str:
    startup = result["summary"]["startup"].get("wall_s", 0.0)
    cache = result.get("cache", "as-found")
    parts = page_top(
        "Merge benchmark",
        result,
        f"Inputs {result['input_bytes'] / GB:.2f} GB (three checkpoints), output "
        f"{result['output_bytes'] / GB:.2f} GB. Page cache: {CACHE_NOTES[cache]}. Median "
        f"(min–max) of {result['repeats']} alternating runs, each in a fresh process. Merge "
        "work = wall − mergekit start-up (`mergekit-yaml --help`); floor = (d). Read from "
        "disk: storage reads of the process tree (0 when the inputs were in the page cache). "
        "Main thread: share of samples running or waiting for a core (R), waiting for the "
        "disk (D) and waiting otherwise (S).",
    )
    parts += [markdown_table(result["summary"], startup), *command_line(result)]
    for name, setting in result.get("transfer_settings", {}).items():
        parts.append(
            f"- {label(name)}: `{' '.join(f'{k}={v}' for k, v in setting['env'].items())} "
            f"mergekit-yaml ... {' '.join([*result['mergekit_args'], *setting['mergekit_args']])}`"
        )
    heading = "Elements that differ from float64 `target + (ft − sb)` rounded once:"
    parts += verification_lines(result, label, heading)
    return "\n".join(parts) + "\n"


def parse_transfer_setting(text: str) -> tuple[str, tuple[dict, tuple[str, ...]]]:
    """``LABEL=ARGS``: a transfer variant with its own mergekit options; leading
    ``NAME=VALUE`` words of ARGS are environment variables of that run."""
    name, _, rest = text.partition("=")
    if not name or not _:
        raise ValueError(f"{text!r}: expected LABEL=ARGS, e.g. 'j1=-j 1'")
    words = shlex.split(rest)
    env = {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return f"transfer {name}", (env, tuple(words))


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
    parser.add_argument(
        "--transfer-setting", action="append", default=[], metavar="LABEL=ARGS",
        help="one more transfer variant with extra mergekit options (and leading NAME=VALUE "
        "environment variables), e.g. 'j2=-j 2' or 'arenas=MALLOC_ARENA_MAX=2 --no-async-write'",
    )  # fmt: skip
    parser.add_argument(
        "--cache", choices=sorted(CACHE_NOTES), default="as-found",
        help="page cache state of the inputs before each run (cold: drop them from it; "
        "warm: read them into it); every run records the resident fraction either way",
    )  # fmt: skip
    parser.add_argument("--label", default="", help="appended to the result file names")
    args = parser.parse_args(argv)
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    try:
        transfer_settings = dict(parse_transfer_setting(text) for text in args.transfer_setting)
    except ValueError as error:
        parser.error(str(error))
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
        variants=(*variants, *transfer_settings),
        mergekit_args=tuple(args.mergekit_args.split()),
        memory_cap_bytes=int(cap),
        verify=args.verify,
        results=args.results,
        env=env,
        cache=args.cache,
        transfer_settings=transfer_settings,
        label=args.label,
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
    print(
        f"wrote {result_stem(settings.results, settings.size, result['started_utc'], settings.label)}.md and .json"
    )


if __name__ == "__main__":
    main()
