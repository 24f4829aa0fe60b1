"""Reaching a model on the Hugging Face Hub: one quick request, and what its failure means.

transformers and mergekit retry a failed Hub request for about 25 s before they raise an
``OSError`` that no longer says whether the network is down, the repository gated, the
revision unknown or the id misspelled. :func:`probe` asks the Hub once, without retries,
and :func:`explain` turns what huggingface_hub raises into one line that names the
repository and the fix.
"""

from __future__ import annotations

import os

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

LOGIN = "`hf auth login` (`huggingface-cli login` before huggingface_hub 1.0) or set HF_TOKEN"


def is_repo_id(name: str) -> bool:
    """Whether ``name`` is a well-formed Hub repository id (``org/name`` or ``name``),
    by huggingface_hub's own rules; no network. The one Hub-id test of the package."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def probe(repo_id: str, filename: str, revision: str | None = None) -> None:
    """Ask the Hub for ``filename``'s metadata once, without retries; raise what it raises.

    With ``HF_HUB_OFFLINE`` set this raises :class:`OfflineModeIsEnabled` without asking.
    """
    if constants.is_offline_mode():
        raise OfflineModeIsEnabled(f"HF_HUB_OFFLINE is set: {repo_id} was not looked up.")
    url = huggingface_hub.hf_hub_url(repo_id, filename, revision=revision)
    huggingface_hub.get_hf_file_metadata(url, retry_on_errors=False)


def url(repo_id: str) -> str:
    return f"{constants.ENDPOINT}/{repo_id}"


def explain(
    error: BaseException, repo_id: str, revision: str | None = None, filename: str | None = None
) -> str | None:
    """One line naming ``repo_id``, what went wrong and the fix; None if ``error`` is not a
    Hub access problem (then it is a bug, and keeps its traceback)."""
    # Subclasses first: GatedRepoError is a RepositoryNotFoundError, and every HTTP error
    # of huggingface_hub is an HfHubHTTPError.
    if isinstance(error, GatedRepoError):
        if huggingface_hub.get_token() is None:
            return (
                f"{repo_id} is a gated repository and this machine is not logged in to the "
                f"Hugging Face Hub: accept its terms at {url(repo_id)} (access is granted "
                f"per account), then log in with {LOGIN}."
            )
        return (
            f"{repo_id} is a gated repository and the Hugging Face account of this machine's "
            f"token has no access to it: request access at {url(repo_id)} and wait for the "
            f"approval; if another account has access, log in with it ({LOGIN})."
        )
    if isinstance(error, RevisionNotFoundError):
        return (
            f"{repo_id} has no revision {revision!r} (a branch, tag or commit): check the name "
            f"(after '@' in a recipe, `model_revision` in a training config); the branches "
            f"and tags are listed at {url(repo_id)}/tree/main."
        )
    if isinstance(error, RemoteEntryNotFoundError):
        return (
            f"{repo_id} on the Hub has no {filename or 'such file'}, so it is not what the "
            "recipe needs there: a transformers model has config.json; a PEFT adapter has "
            "adapter_config.json and is written `BASE+ADAPTER`."
        )
    if isinstance(error, RepositoryNotFoundError):
        return (
            f"{repo_id} is neither a local folder nor a repository on the Hub: check the "
            f"spelling (organisation/name, as in {constants.ENDPOINT}/meta-llama/Llama-3.1-8B); "
            f"if it is private, log in with {LOGIN}."
        )
    if isinstance(error, DisabledRepoError):
        return f"{repo_id} has been disabled on the Hub by its owner: use another copy."
    if isinstance(error, OfflineModeIsEnabled):
        return (
            f"{repo_id} is on the Hugging Face Hub and HF_HUB_OFFLINE is set: unset it, or "
            f"download the model while online ({download_hint(repo_id, revision)}) and "
            "write that folder in the recipe."
        )
    if isinstance(error, HfHubHTTPError):
        status = getattr(error.response, "status_code", "an error")
        return (
            f"the Hub answered {status} when asked for {repo_id}: "
            f"{str(error).splitlines()[0]}. Try again later."
        )
    if is_network_error(error):
        return (
            f"cannot reach {constants.ENDPOINT} to fetch {repo_id} "
            f"({type(error).__name__}: {error}): connect to the internet, or download the "
            f"model ahead of time on a machine that can ({download_hint(repo_id, revision)}) "
            "and write that folder in the recipe."
        )
    return None


def download_hint(repo_id: str, revision: str | None = None) -> str:
    folder = repo_id.split("/")[-1]
    pinned = f" --revision {revision}" if revision else ""
    return f"`hf download {repo_id}{pinned} --local-dir models/{folder}`"


def is_network_error(error: BaseException) -> bool:
    """A connection that failed or timed out (no answer from the Hub at all)."""
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    try:  # whichever of the two HTTP clients this huggingface_hub uses
        import httpx2 as http
    except ImportError:
        try:
            import httpx as http
        except ImportError:
            return False
    return isinstance(error, http.TransportError)


def cached_snapshot(repo_id: str, revision: str | None = None) -> str | None:
    """The local cache folder of ``repo_id`` at ``revision``, if its config.json is there."""
    config = huggingface_hub.try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return os.path.dirname(config) if isinstance(config, str) else None
