"""Evaluate several models on a suite through ``lm_eval.simple_evaluate``.

Layout under ``output_dir`` (lm-eval's own, with the model label as the folder name):

    <output_dir>/<label>/results_<date>.json          one per finished task (EvaluationTracker)
    <output_dir>/<label>/samples_<task>_<date>.jsonl  per-sample logs
    <output_dir>/<label>/ftt_run.json                 the ModelSpec and the suite's columns

Each column's task is evaluated in its own ``simple_evaluate`` call on one loaded model, so
that the chat settings can differ per task and a crash loses at most the task in progress:
a rerun skips every task that already has a results file with the same ``limit`` and
chat settings.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mergekit_ftt.errors import FttError
from mergekit_ftt.eval import backends
from mergekit_ftt.eval.options import BackendOptions
from mergekit_ftt.eval.suites import SUITES_DIR, Column, Suite, adhoc_suite, load_suite
from mergekit_ftt.sources import (
    Missing,
    Wanted,
    find_model,
    missing_dataset,
    raise_unavailable,
    work_offline_if_hub_unreachable,
)

log = logging.getLogger(__name__)

RUN_FILE = "ftt_run.json"
_UNSAFE_LABEL = re.compile(r"[/\\\x00]|^\.{1,2}$")


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate.

    ``label`` names the table row and the output folder. ``base`` is the label of the
    target base model this row was transferred onto (a "+ Δ" row); the report shows
    such rows with their gain over that base.
    """

    label: str
    pretrained: str  # local folder or Hub id
    base: str | None = None
    # lm-eval model arguments made when the model is first needed, replacing those derived
    # from ``pretrained``: e.g. ``{"pretrained": <transformers model>, "tokenizer": ...}``
    # for a model built in this process (hf backend; it is used on its own device and
    # dtype). Not called when every task is already finished.
    load: Callable[[], dict[str, Any]] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.label or _UNSAFE_LABEL.search(self.label):
            raise FttError(
                f"model label {self.label!r} cannot be a folder name (no '/', '\\\\', '.', '..')"
            )


def missing_evaluable(name_or_path: str) -> Missing | None:
    """None if ``name_or_path`` is a model lm-eval can load: a local folder with a config and
    readable weights, or a Hub model in reach (or, offline, in the cache); else what is
    missing (:mod:`mergekit_ftt.sources`). A delta folder or damaged weights are refused
    with an :class:`FttError` at once."""
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return find_model(Wanted(name_or_path))
    from mergekit.common import ModelReference
    from mergekit.options import MergeOptions

    from mergekit_ftt.delta.format import is_delta_folder
    from mergekit_ftt.preflight.checkpoints import read_checkpoint

    if is_delta_folder(folder):
        raise FttError(
            f"{name_or_path} is a delta folder (ftt-delta extract), not a model: add it to a "
            "base model with mergekit-yaml (`role: delta`) and evaluate the merged folder."
        )
    missing = find_model(Wanted(name_or_path))  # its config.json
    if missing is None:
        read_checkpoint(ModelReference.parse(str(folder)), MergeOptions(quiet=True))  # weights
    return missing


def resolve_suite(
    suite_or_tasks: str | Suite | Sequence[str],
    include_paths: Sequence[Path],
    apply_chat_template: bool | None,
    fewshot_as_multiturn: bool | None,
) -> Suite:
    """A Suite from a suite name, a Suite, or a list of task names; caller settings win."""
    if isinstance(suite_or_tasks, Suite):
        suite = suite_or_tasks
    elif isinstance(suite_or_tasks, str):
        suite = load_suite(suite_or_tasks, include_paths)
    else:
        suite = adhoc_suite(list(suite_or_tasks))
    overrides = {
        key: value
        for key, value in (
            ("apply_chat_template", apply_chat_template),
            ("fewshot_as_multiturn", fewshot_as_multiturn),
        )
        if value is not None
    }
    return replace(suite, **overrides)


def _missing(index: dict, names: Sequence[str]) -> list[str]:
    """Names, and members of the groups among them, that ``index`` cannot resolve."""
    missing: list[str] = []
    for name in names:
        entry = index.get(name)
        if entry is None:
            missing.append(name)
            continue
        members = (entry.cfg or {}).get("task") if entry.cfg and "group" in entry.cfg else None
        for member in members if isinstance(members, list) else ():
            if isinstance(member, str):
                missing += _missing(index, [member])
            elif "group" in member and member["group"] in index:
                missing += _missing(index, [member["group"]])
            elif member.get("task") in index:  # a reference with overrides, not an inline task
                missing += _missing(index, [member["task"]])
    return missing


def _yaml_state(paths: Sequence[str]) -> tuple[tuple[str, int], ...]:
    return tuple(
        (str(f), f.stat().st_mtime_ns) for p in paths for f in sorted(Path(p).rglob("*.yaml"))
    )


@functools.cache
def _cached_manager(paths: tuple[str, ...], builtin: bool, state: tuple):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=builtin)


def _manager(paths: tuple[str, ...], builtin: bool):
    # Keyed on the YAML files' mtimes too, so a task file edited between two calls is re-read.
    return _cached_manager(paths, builtin, _yaml_state(paths))


def task_manager(include_paths: Sequence[Path], tasks: Sequence[str]):
    """lm-eval's TaskManager over our suites and the caller's folders, and lm-eval's built-in
    tasks only when ``tasks`` need them: indexing the built-ins takes tens of seconds, so
    managers are also kept for later calls in the same process."""
    paths = (str(SUITES_DIR), *map(str, include_paths))
    local = _manager(paths, builtin=False)
    if not _missing(local.task_index, tasks):
        return local
    manager = _manager(paths, builtin=True)
    unknown = _missing(manager.task_index, tasks)
    if unknown:
        skipped = "".join(
            f"; lm-eval skipped {path} ({problem}): fix it"
            for path, problem in unreadable_yaml(include_paths)
        )
        raise FttError(
            f"lm-eval knows no task or group named {', '.join(dict.fromkeys(unknown))}; "
            f"check the spelling or add the folder holding its YAML with --include-path{skipped}"
        )
    return manager


def unreadable_yaml(folders: Sequence[Path]) -> list[tuple[Path, str]]:
    """The task files under ``folders`` that lm-eval skips with a warning, so that their
    tasks are simply unknown: not valid YAML, or including a file that is not there."""
    import yaml

    class Loader(yaml.SafeLoader):  # lm-eval's tags (!function) need not resolve here
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    found = []
    for path in (f for folder in folders for f in sorted(Path(folder).rglob("*.yaml"))):
        try:
            document = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            mark = getattr(error, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            problem = getattr(error, "problem", None) or error
            found.append((path, f"not valid YAML, {where}{problem}"))
            continue
        included = document.get("include") if isinstance(document, dict) else None
        if isinstance(included, str) and not (path.parent / included).is_file():
            found.append((path, f"it includes {included}, which is not in {path.parent}"))
    return found


def missing_datasets(suite: Suite, manager, include_paths: Sequence[Path] = ()) -> list[Missing]:
    """Build each column's tasks once, as lm-eval will (loading their datasets into the
    datasets cache), so that a dataset out of reach, or a task lm-eval cannot build from
    its YAML, stops the run before any model loads; return every one, each with its fix
    (for a Hub dataset, the lm-eval command that fetches it)."""
    from lm_eval.tasks import get_task_dict

    from mergekit_ftt import hub

    missing = []
    for column in suite.columns:
        task = column.task
        try:
            tasks = get_task_dict([task], task_manager=manager)
        except Exception as error:  # lm-eval building the user's task YAML: any type
            if hub.classify(error) is not None or isinstance(error, FileNotFoundError):
                what = f"the dataset of task {task!r}"
                fetch = fetch_task_command(task, include_paths)
                missing.append(missing_dataset(error, what, fetch))
            else:
                missing.append(_unbuildable(task, manager, _root_cause(error)))
            continue
        missing += [
            _unbuildable(task, manager, f"{name!r} is not a metric lm-eval knows", where=built)
            for built, name in _unknown_metrics(tasks)
        ]
    return missing


def _unbuildable(task: str, manager, problem: str, where: str | None = None) -> Missing:
    """A task whose YAML lm-eval cannot turn into a task."""
    entry = manager.task_index.get(task)
    yaml_path = getattr(entry, "yaml_path", None) or "its YAML"
    named = task if where in (None, task) else f"{task} ({where})"
    fix = f"fix {yaml_path}"
    message = f"lm-eval cannot build task {named!r}: {problem}; {fix}."
    return Missing(named, f"lm-eval cannot build it: {problem}", fix, message, kind="task")


def _unknown_metrics(tasks: dict) -> list[tuple[str, str]]:
    """(task, metric) for each metric of a built task that lm-eval has no function for: it
    only warns, and the evaluation fails after the model has been loaded."""
    found = []
    for name, task in tasks.items():
        if isinstance(task, dict):  # a group: its tasks
            found += _unknown_metrics(task)
            continue
        if getattr(getattr(task, "config", None), "process_results", None) is not None:
            continue  # its own function scores every metric (ifeval): None is expected
        # lm-eval 0.4 keeps the metric functions it resolved (None where it found none) only
        # in this attribute; there is no public accessor, hence getattr with a default.
        functions = getattr(task, "_metric_fn_list", None) or {}
        found += [(str(name), metric) for metric, fn in functions.items() if fn is None]
    return found


def _root_cause(error: BaseException) -> str:
    """The first line of ``error``'s message, and of the deepest error it was raised from
    when that says more (datasets' "An error occurred while generating the dataset")."""
    first = str(error).strip().splitlines() or [type(error).__name__]
    root = error
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    inner = str(root).strip().splitlines()
    if root is error or not inner or inner[0] in first[0]:
        return first[0].rstrip(".")
    return f"{first[0].rstrip('.')}: {inner[0].rstrip('.')}"


def fetch_task_command(task: str, include_paths: Sequence[Path] = ()) -> str:
    """The lm-eval command that loads ``task``'s datasets into the datasets cache (one
    example with lm-eval's dummy model), with the folder that defines it if it is ours."""
    folder = next(
        (
            path
            for path in (SUITES_DIR, *include_paths)
            if task in _manager((str(path),), builtin=False).task_index
        ),
        None,
    )
    where = f" --include_path {folder}" if folder is not None else ""
    return f"`lm-eval run --model dummy --tasks {task} --limit 1{where}`"


def _settings(limit: float | None, chat: bool, multiturn: bool) -> tuple:
    """What makes two results of one task comparable (besides the model)."""
    return (limit, chat, multiturn)


def finished_tasks(model_dir: Path) -> dict[tuple[str, tuple], Path]:
    """(task or group name, settings) -> the newest results file holding it."""
    done: dict[tuple[str, tuple], Path] = {}
    for path in sorted(model_dir.glob("results_*.json")):  # dated names sort oldest first
        results = json.loads(path.read_text(encoding="utf-8"))
        settings = _settings(
            results.get("config", {}).get("limit"),
            bool(results.get("chat_template")),
            bool(results.get("fewshot_as_multiturn")),
        )
        for name in [*results.get("results", {}), *results.get("group_subtasks", {})]:
            done[name, settings] = path
    return done


def _record_run(model_dir: Path, spec: ModelSpec, suite: Suite, force: bool) -> None:
    """Write ftt_run.json; refuse to mix two different models under one label."""
    record_path = model_dir / RUN_FILE
    columns = [asdict(c) for c in suite.columns]
    if record_path.exists():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record["model"]["pretrained"] != spec.pretrained and not force:
            raise FttError(
                f"{model_dir} holds results of {record['model']['pretrained']!r}, not "
                f"{spec.pretrained!r}; choose another label or output folder, or pass --force"
            )
        known = {c["task"] for c in columns}
        columns = [c for c in record["columns"] if c["task"] not in known] + columns
    model_dir.mkdir(parents=True, exist_ok=True)
    record_path.write_text(
        json.dumps(
            {
                "model": {"label": spec.label, "pretrained": spec.pretrained, "base": spec.base},
                "columns": columns,
            },
            indent=2,
            ensure_ascii=False,
        ),
        encoding="utf-8",
    )


@contextlib.contextmanager
def _removed_on_error(model_dir: Path) -> Iterator[None]:
    """A model's result folder made by this run is removed again if the run fails before
    any result is in it (nothing half-made is left behind; earlier results are kept)."""
    made = [p for p in (model_dir.parent, model_dir) if not p.exists()]
    try:
        yield
    except BaseException:
        if not any(model_dir.glob("results_*.json")):
            for folder in made[:1]:
                shutil.rmtree(folder, ignore_errors=True)
        raise


def _load_lm(backend: str, args: dict[str, Any], batch_size: int | str):
    from lm_eval.api.registry import get_model

    return get_model(backend).create_from_arg_obj(args, {"batch_size": batch_size})


def _run_task(
    lm,
    args: dict[str, Any],
    column: Column,
    suite: Suite,
    model_dir: Path,
    manager,
    limit: float | None,
    seed: int,
    log_samples: bool,
) -> Path:
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    chat, multiturn = suite.chat_settings(column)
    # A ".json" output path makes the tracker write into model_dir itself instead of
    # a subfolder named after the (sanitised) model path.
    tracker = EvaluationTracker(output_path=str(model_dir / "results.json"))
    results = simple_evaluate(
        model=lm,
        model_args=args,  # recorded in the results; the model itself is already loaded
        tasks=[column.task],
        task_manager=manager,
        limit=limit,
        log_samples=log_samples,
        evaluation_tracker=tracker,
        apply_chat_template=chat,
        fewshot_as_multiturn=multiturn,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    samples = results.pop("samples", None)
    tracker.save_results_aggregated(results=results, samples=samples)
    for name in results["configs"] if samples else ():
        tracker.save_results_samples(task_name=name, samples=samples[name])
    return model_dir / f"results_{tracker.date_id}.json"


def evaluate_models(
    models: Sequence[ModelSpec],
    suite_or_tasks: str | Suite | Sequence[str],
    output_dir: str | Path,
    *,
    backend: str | None = None,
    options: BackendOptions | None = None,
    include_path: Sequence[str | Path] = (),
    limit: float | None = None,
    force: bool = False,
    apply_chat_template: bool | None = None,
    fewshot_as_multiturn: bool | None = None,
    log_samples: bool = True,
    on_model_done: Callable[[str], object] = lambda label: None,
) -> dict[str, dict[str, Path]]:
    """Evaluate ``models`` on a suite (name or Suite) or a list of lm-eval task names.

    Returns, per model label, the results file of each column's task. Finished tasks
    are read back, not recomputed, unless ``force``. ``on_model_done(label)`` is called
    after each model (a progress bar).
    """
    include_paths = [Path(p) for p in include_path]
    suite = resolve_suite(suite_or_tasks, include_paths, apply_chat_template, fewshot_as_multiturn)
    backend = backend or backends.default_backend()
    options = options or BackendOptions()
    backends.require_backend(backend, options)
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise FttError(f"model labels must be unique, got {labels}")
    # Everything a run needs is checked before the first result is written.
    work_offline_if_hub_unreachable()
    # a model built in this process (``load``) needs no download
    missing = [missing_evaluable(spec.pretrained) for spec in models if spec.load is None]
    manager = task_manager(include_paths, [c.task for c in suite.columns])
    raise_unavailable([*filter(None, missing), *missing_datasets(suite, manager, include_paths)])

    output_dir = Path(output_dir)
    written: dict[str, dict[str, Path]] = {}
    for spec in models:
        model_dir = output_dir / spec.label
        with _removed_on_error(model_dir):
            _record_run(model_dir, spec, suite, force)
            done = {} if force else finished_tasks(model_dir)
            # The suite's defaults (e.g. OLMES's add_bos_token) yield to what the caller set.
            args = {**suite.model_args, **backends.model_args(backend, spec.pretrained, options)}
            lm = None
            written[spec.label] = {}
            for column in suite.columns:
                previous = done.get((column.task, _settings(limit, *suite.chat_settings(column))))
                if previous is not None:
                    log.info(
                        "%s / %s: finished in %s, not recomputed",
                        spec.label,
                        column.task,
                        previous,
                    )
                    written[spec.label][column.task] = previous
                    continue
                if lm is None:  # load only when some task is left to run
                    loaded = {**args, **spec.load()} if spec.load else args
                    lm = _load_lm(backend, loaded, backends.batch_size(backend, options))
                written[spec.label][column.task] = _run_task(
                    lm, args, column, suite, model_dir, manager, limit, options.seed, log_samples
                )
        del lm  # free the weights (and vLLM's engine) before the next model loads
        gc.collect()
        on_model_done(spec.label)
    return written
