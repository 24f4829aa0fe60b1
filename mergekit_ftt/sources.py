"""Where models and datasets come from: local folders or the Hugging Face Hub.

The one model lookup of the package: every command (mergekit-yaml's preflight,
``ftt-inspect``, ``ftt-sweep``, ``ftt-delta extract``, ``ftt-eval``, ``ftt-train``) asks
:func:`find_model` whether a model is a local folder, a Hub repository (at a revision)
this machine can fetch, or, offline, one in the Hugging Face cache. The commands check
every model and dataset before they write anything and name all they cannot reach in one
line (:func:`unavailable`), each with the command that fetches it, instead of a library's
traceback after minutes of retries.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

from mergekit_ftt import hub
from mergekit_ftt.errors import FttError

log = logging.getLogger(__name__)

# mergekit's order of preference (mergekit.io.lazy_tensor_loader.ShardedTensorIndex).
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
TRANSFORMERS_MODEL = ("config.json", "a transformers model")
LORA_ADAPTER = ("adapter_config.json", "a PEFT LoRA adapter")


def is_finished_model(folder: Path) -> bool:
    """A folder that already holds a saved model (config and weights at its top level)."""
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json"))
    return (folder / "config.json").is_file() and has_weights


_found_unreachable: str | None = None  # why work_offline_if_hub_unreachable went offline


def work_offline_if_hub_unreachable(timeout: float = 3.0) -> bool:
    """True when working offline: ``HF_HUB_OFFLINE`` is set, or the Hub cannot be reached.

    In the second case this sets ``HF_HUB_OFFLINE=1`` (before the Hugging Face libraries
    read it, and in those already imported) so that cached models and datasets load at
    once and missing ones fail at once, instead of after huggingface_hub's retries
    (about 25 s per file).
    """
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return False
    except OSError as error:
        log.warning("%s is unreachable (%s): working offline, from local files", host, error)
        global _found_unreachable
        _found_unreachable = f"{host} cannot be reached, {type(error).__name__}: {error}"
    os.environ["HF_HUB_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    return True


# --- what cannot be had -------------------------------------------------------------------


@dataclass(frozen=True)
class Missing:
    """One model or dataset this machine cannot load: what it is, why, and the fix."""

    name: str  # as the user wrote it, with its revision
    problem: str  # short, for a list of several: "not a local folder", "a gated repository"
    fix: str  # short: the command that fetches it, or what to change
    message: str  # the whole explanation, when it is the only one
    kind: str = "model"  # or "dataset"
    cause: str | None = None  # shared by several, said once: "HF_HUB_OFFLINE is set"


def unavailable(missing: Sequence[Missing]) -> str:
    """One line naming every model and dataset in ``missing``, each with its fix."""
    if len(missing) == 1:
        return missing[0].message
    counts = {}
    for item in missing:
        counts[item.kind] = counts.get(item.kind, 0) + 1
    what = " and ".join(f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in counts.items())
    causes = {item.cause for item in missing}
    shared = causes.pop() if len(causes) == 1 else None
    listed = "; ".join(
        f"{m.name}: {m.problem}{f', and {m.cause}' if m.cause and not shared else ''}; {m.fix}"
        for m in missing
    )
    return f"cannot load {what}{f' ({shared})' if shared else ''}: {listed}."


def raise_unavailable(missing: Sequence[Missing], error: type[FttError] = FttError) -> None:
    """Raise ``error`` naming everything in ``missing``; nothing when it is empty."""
    if missing:
        raise error(unavailable(missing))


# --- models ---------------------------------------------------------------------------------


class Wanted(NamedTuple):
    """A model a command will load: a local folder or a Hub id, at a revision."""

    name: str
    revision: str | None = None
    marker: str = TRANSFORMERS_MODEL[0]  # the file that makes the folder what it must be
    kind: str = TRANSFORMERS_MODEL[1]


def hub_id(name: str) -> str | None:
    """``name`` if it names a Hub repository rather than a local folder (no network): not
    an existing path, not written as one (``./x``, ``/x``, ``~/x``, ``merged/x`` beside an
    existing ``merged/``), and a well-formed repository id."""
    if os.path.exists(os.path.expanduser(name)) or _looks_like_a_path(name):
        return None
    return name if hub.is_repo_id(name) else None


def find_model(wanted: Wanted, cache_suffices: bool = True) -> Missing | None:
    """None if ``wanted`` can be loaded, else what is wrong and how to fix it.

    A local folder must hold its marker file (config.json, adapter_config.json). A Hub
    repository is asked for once, without retries (:func:`hub.probe`). Offline, a copy
    in the Hugging Face cache serves where ``cache_suffices`` (transformers, TRL, lm-eval
    load from it); mergekit 0.1.5 lists a Hub model's files on the Hub before every merge,
    even a cached one, so for mergekit the cached copy's folder is named instead.
    """
    name, revision, marker, kind = wanted
    folder = Path(name).expanduser()
    if folder.is_dir():
        if (folder / marker).is_file():
            return None
        return Missing(
            name,
            f"has no {marker}",
            f"give the folder of {kind}, the one that holds {marker}",
            f"{name} has no {marker}, so it is not {kind} folder: give the folder that holds "
            f"{marker}.",
        )
    if folder.exists():
        return Missing(
            name,
            "is a file",
            f"give the folder of {kind} (the one with {marker})",
            f"{name} is a file; give the folder of {kind} (the one with {marker}).",
        )
    if hub_id(name) is None:
        looked = f"no such local folder (looked in {Path.cwd()})"
        fix = (
            "check the path (a Hub id is organisation/name, without ./ or a local folder before it)"
            if _looks_like_a_path(name)
            else "check the path; it is not a Hub model id (organisation/name) either"
        )
        return Missing(name, looked, fix, f"model {name!r}: {looked}; {fix}.")
    try:
        hub.probe(name, marker, revision=revision)
        return None
    except Exception as error:
        reason = hub.classify(error)
        if reason is None:
            raise  # not a Hub access problem: a bug, with its traceback
        if reason in hub.UNREACHABLE:
            return _unreachable(wanted, reason, error, cache_suffices)
        return _refused_by_hub(wanted, reason, error)


def missing_models(wanted: Iterable[Wanted], cache_suffices: bool = True) -> list[Missing]:
    """Every model of ``wanted`` that cannot be loaded (each asked for once)."""
    found = (find_model(w, cache_suffices) for w in dict.fromkeys(wanted))
    return [missing for missing in found if missing is not None]


def require_models(
    wanted: Iterable[Wanted], error: type[FttError] = FttError, cache_suffices: bool = True
) -> None:
    """Raise ``error`` naming every model of ``wanted`` that cannot be loaded, at once."""
    raise_unavailable(missing_models(wanted, cache_suffices), error)


def _at(name: str, revision: str | None) -> str:
    return f"{name}@{revision}" if revision else name


def _refused_by_hub(wanted: Wanted, reason: str, error: BaseException) -> Missing:
    """The Hub answered: gated, unknown, no such revision or file, disabled, or busy."""
    name, revision, marker, _ = wanted
    message = hub.explain(error, name, revision=revision, filename=marker)
    problem, fix = {
        hub.GATED: ("a gated repository", hub.gated_fix(name)),
        hub.NO_REVISION: (f"no revision {revision!r} on the Hub", "check the revision"),
        hub.NO_FILE: (f"the Hub repository has no {marker}", f"give {wanted.kind}"),
        hub.NOT_FOUND: (
            "neither a local folder nor a Hub repository",
            f"check the spelling; if it is private, log in with {hub.LOGIN}",
        ),
        hub.DISABLED: ("disabled on the Hub by its owner", "use another copy"),
    }.get(reason, (f"the Hub answered {type(error).__name__}", "try again later"))
    return Missing(_at(name, revision), problem, fix, message)


def _unreachable(
    wanted: Wanted, reason: str, error: BaseException, cache_suffices: bool
) -> Missing | None:
    """Offline (HF_HUB_OFFLINE) or no answer from the Hub: a cached copy may serve."""
    name, revision, _, _ = wanted
    snapshot = hub.cached_snapshot(name, revision)
    if cache_suffices and snapshot is not None:
        return None
    if snapshot is not None and weights_file(snapshot) is None:
        snapshot = None  # only the config was fetched (by transformers, say)
    why = _why_unreachable(reason, error)
    at = _at(name, revision)
    if snapshot is not None:  # only where the cache does not suffice: mergekit
        return Missing(
            at,
            "in the Hugging Face cache, but mergekit asks the Hub for its file list",
            f"write its cached folder {snapshot} in its place",
            f"{at} is in the Hugging Face cache, but mergekit asks the Hub for the file list "
            f"of every Hub model, even a cached one, and {why}: write its cached folder "
            f"{snapshot} in its place, or connect to the Hub.",
            cause=why,
        )
    fetch = hub.download_hint(name, revision, cache=cache_suffices)
    nowhere = "a local folder nor in the Hugging Face cache" if cache_suffices else "a local folder"
    use = (
        "then it loads from the Hugging Face cache, HF_HUB_OFFLINE=1 or not"
        if cache_suffices
        else "and write that folder in its place"
    )
    return Missing(
        at,
        f"not {nowhere}",
        f"fetch it with {fetch} where the Hub is reachable"
        + ("" if cache_suffices else ", then write that folder in its place"),
        f"cannot load {at}: {why}, and it is not {nowhere} (looked in {Path.cwd()}). "
        f"Fetch it where the Hub is reachable ({fetch}) {use}."
        # a name without organisation is more often a mistyped folder than a Hub id
        + ("" if "/" in name else " If a local folder was meant, check the path."),
        cause=why,
    )


def _why_unreachable(reason: str, error: BaseException) -> str:
    """Why the Hub was not asked, or did not answer."""
    if hub.constants.is_offline_mode():
        return _found_unreachable or "HF_HUB_OFFLINE is set"  # set by this command, or not
    if reason == hub.NETWORK:
        return f"{hub.constants.ENDPOINT} cannot be reached, {type(error).__name__}: {error}"
    return "HF_HUB_OFFLINE is set"


def weights_file(folder: str) -> str | None:
    """The weight file mergekit would read in ``folder`` (its first of WEIGHT_FILES), or None."""
    return next((f for f in WEIGHT_FILES if os.path.exists(os.path.join(folder, f))), None)


def _looks_like_a_path(name: str) -> bool:
    """``./x``, ``~/x``, ``/x`` or ``merged/x`` beside an existing ``merged/``: a folder the
    user meant, never a Hub id (``merged/nope`` must not be looked up on the Hub)."""
    parent = Path(name).expanduser().parent
    return name.startswith((".", "/", "~")) or (parent != Path() and parent.is_dir())


# --- datasets -------------------------------------------------------------------------------


def missing_dataset(error: BaseException, what: str, fetch: str | None = None) -> Missing:
    """``what`` (a dataset) could not be loaded because of ``error``: the Hub dataset its
    message names, if any, why, and ``fetch``, the command that fills the datasets cache
    (default: ``datasets.load_dataset`` of that Hub dataset)."""
    reason = _one_line(error)
    hub_name = re.search(r"'([\w.-]+/[\w.-]+)'", reason)
    path = hub_name[1] if hub_name else None
    if fetch is None and path is not None:
        fetch = f"`python -c \"import datasets; datasets.load_dataset('{path}')\"`"
    name = f"{path} ({what})" if path else what
    kind = hub.classify(error)
    if kind == hub.GATED and path:
        fix = f"accept its terms at {hub.url('datasets/' + path)}, then log in with {hub.LOGIN}"
        message = f"cannot load {what}: {path} is a gated dataset on the Hub; {fix}."
        return Missing(name, "a gated dataset", fix, message, kind="dataset")
    if kind in hub.UNREACHABLE and fetch is not None:
        fix = f"fetch it with {fetch} where the Hub is reachable"
        message = (
            f"cannot load {what}: {reason}. To use it offline, {fix}: that fills the datasets "
            "cache, which it then loads from, HF_HUB_OFFLINE=1 or not."
        )
        cause = _why_unreachable(kind, error)
        return Missing(name, "not in the datasets cache", fix, message, "dataset", cause)
    fix = "check the dataset's name and settings"
    return Missing(name, reason, fix, f"cannot load {what}: {reason}; {fix}.", "dataset")


class DatasetUnavailable(FttError):
    """Datasets that cannot be loaded; ``missing`` says why, to be listed with others."""

    def __init__(self, missing: Sequence[Missing]) -> None:
        super().__init__(unavailable(missing))
        self.missing = list(missing)


def dataset_error(error: BaseException, what: str) -> DatasetUnavailable:
    """A one-line error for ``what`` (a dataset) that could not be loaded."""
    return DatasetUnavailable([missing_dataset(error, what)])


def _one_line(error: BaseException) -> str:
    """The first line of a library's message, without its trailing full stop."""
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__).rstrip(".")
