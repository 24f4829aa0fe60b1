"""Where models and datasets come from: local folders or the Hugging Face Hub.

The commands check every model and dataset before they write anything, and name what
they cannot reach in one line, with how to fetch it ahead of time for offline use, instead
of a library's traceback after minutes of retries.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from mergekit_ftt import hub
from mergekit_ftt.errors import FttError

log = logging.getLogger(__name__)

OFFLINE_DATASET_HINT = (
    "To use it offline, load it once where the Hub is reachable (this command, or "
    "datasets.load_dataset('{path}') in Python, fills the datasets cache), then run with "
    "HF_HUB_OFFLINE=1."
)


def is_finished_model(folder: Path) -> bool:
    """A folder that already holds a saved model (config and weights at its top level)."""
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json"))
    return (folder / "config.json").is_file() and has_weights


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
    os.environ["HF_HUB_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    return True


def require_model(name_or_path: str, revision: str | None = None) -> None:
    """Fail with a one-line :class:`FttError` unless ``name_or_path`` is a local model folder,
    a Hub model this machine can fetch, or (offline) one in the Hugging Face cache, which
    transformers loads from there. The Hub is asked once, without retries (:mod:`hub`)."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise FttError(f"model folder {name_or_path} has no config.json: not a saved model.")
        return
    if _looks_like_a_path(name_or_path):
        raise FttError(
            f"model {name_or_path!r}: no such local folder (looked in {Path.cwd()}); check "
            "the path (a Hub id is organisation/name, without ./ or a local folder before it)."
        )
    if not hub.is_repo_id(name_or_path):
        raise FttError(
            f"model {name_or_path!r}: no such local folder (looked in {Path.cwd()}), and not a "
            "Hub model id (organisation/name)."
        )
    try:
        hub.probe(name_or_path, "config.json", revision=revision)
        return
    except Exception as error:
        offline = isinstance(error, hub.OfflineModeIsEnabled) or hub.is_network_error(error)
        if offline and hub.cached_snapshot(name_or_path, revision) is not None:
            return
        message = hub.explain(error, name_or_path, revision=revision, filename="config.json")
        if message is None:
            raise
    if offline:
        at = f" (revision {revision})" if revision else ""
        message = (
            f"cannot load model {name_or_path!r}{at}: the Hub is unreachable (offline) and it "
            "is not in the local Hugging Face cache. To use it offline, download it where the "
            f"Hub is reachable ({hub.download_hint(name_or_path, revision)}) and give that "
            "folder as the model, or fill the cache there and run with HF_HUB_OFFLINE=1."
        )
    raise FttError(message)


def _looks_like_a_path(name: str) -> bool:
    """``./x``, ``~/x``, ``/x`` or ``merged/x`` beside an existing ``merged/``: a folder the
    user meant, never a Hub id (``merged/nope`` must not be looked up on the Hub)."""
    parent = Path(name).expanduser().parent
    return name.startswith((".", "/", "~")) or (parent != Path() and parent.is_dir())


def dataset_error(error: BaseException, what: str) -> FttError:
    """A one-line error for ``what`` (a dataset) that could not be loaded, naming the Hub
    dataset in ``error``'s message, if any, in the offline recipe."""
    reason = _one_line(error)
    hub_id = re.search(r"'([\w.-]+/[\w.-]+)'", reason)
    hint = OFFLINE_DATASET_HINT.format(path=hub_id[1]) if hub_id else ""
    return FttError(f"cannot load {what}: {reason}. {hint}".strip())


def _one_line(error: BaseException) -> str:
    """The first line of a library's message, without its trailing full stop."""
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__).rstrip(".")
