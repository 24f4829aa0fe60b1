"""Reaching a model on the Hugging Face Hub: one quick request, and what its failure means.

transformers and mergekit retry a failed Hub request for about 25 s before they raise an
``OSError`` that no longer says whether the network is down, the repository gated, the
revision unknown or the id misspelled. :func:`probe` asks the Hub once, without retries,
:func:`classify` names what huggingface_hub raised (through the errors transformers and
datasets wrap it in), and :func:`explain` turns it into one line that names the repository
and the fix. The model lookup built on these is :mod:`mergekit_ftt.sources`.
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


# What went wrong when the Hub was asked for a repository, as :func:`classify` names it.
GATED = "gated"  # a gated repository this account has no access to
NO_REVISION = "no revision"
NO_FILE = "no such file"
NOT_FOUND = "not found"  # misspelled, private or deleted
DISABLED = "disabled"
OFFLINE = "offline"  # HF_HUB_OFFLINE is set: the Hub was not asked
NETWORK = "network"  # no answer from the Hub at all
HUB_ERROR = "hub error"  # the Hub answered with another HTTP error (5xx, 429...)
# Subclasses first: GatedRepoError is a RepositoryNotFoundError, and every HTTP error of
# huggingface_hub is an HfHubHTTPError.
_KINDS = (
    (GatedRepoError, GATED),
    (RevisionNotFoundError, NO_REVISION),
    (RemoteEntryNotFoundError, NO_FILE),
    (RepositoryNotFoundError, NOT_FOUND),
    (DisabledRepoError, DISABLED),
    (OfflineModeIsEnabled, OFFLINE),
    (HfHubHTTPError, HUB_ERROR),
)
UNREACHABLE = (OFFLINE, NETWORK)  # the kinds where a cached copy may still serve


def classify(error: BaseException) -> str | None:
    """What ``error`` says about a Hub repository (one of the kinds above), looking through
    the exceptions it was raised from (transformers and datasets wrap huggingface_hub's);
    None if it is not a Hub access problem (then it is a bug, and keeps its traceback)."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        for kind_type, kind in _KINDS:
            if isinstance(link, kind_type):
                return kind
        if is_network_error(link):
            return NETWORK
        if " is a gated dataset on the Hub" in str(link):  # datasets' DatasetNotFoundError
            return GATED
        link = link.__cause__ or link.__context__
    return None


def gated_fix(repo_id: str) -> str:
    """How to get at a gated repository: its terms, and a login."""
    if huggingface_hub.get_token() is None:
        return (
            f"accept its terms at {url(repo_id)} (access is granted per account), then log "
            f"in with {LOGIN}"
        )
    return (
        f"request access at {url(repo_id)} and wait for the approval; if another account "
        f"has access, log in with it ({LOGIN})"
    )


def explain(
    error: BaseException, repo_id: str, revision: str | None = None, filename: str | None = None
) -> str | None:
    """One line naming ``repo_id``, what the Hub answered and the fix; None if ``error`` is
    not such an answer. Where the Hub was not asked or did not answer (offline, no
    network), a cached copy may serve: :mod:`mergekit_ftt.sources` says what to do."""
    kind = classify(error)
    if kind == GATED:
        who = (
            "this machine is not logged in to the Hugging Face Hub"
            if huggingface_hub.get_token() is None
            else "the Hugging Face account of this machine's token has no access to it"
        )
        return f"{repo_id} is a gated repository and {who}: {gated_fix(repo_id)}."
    if kind == NO_REVISION:
        return (
            f"{repo_id} has no revision {revision!r} (a branch, tag or commit): check the name "
            f"(after '@' in a recipe, `model_revision` in a training config); the branches "
            f"and tags are listed at {url(repo_id)}/tree/main."
        )
    if kind == NO_FILE:
        return (
            f"{repo_id} on the Hub has no {filename or 'such file'}, so it is not what the "
            "recipe needs there: a transformers model has config.json; a PEFT adapter has "
            "adapter_config.json and is written `BASE+ADAPTER`."
        )
    if kind == NOT_FOUND:
        return (
            f"{repo_id} is neither a local folder nor a repository on the Hub: check the "
            f"spelling (organisation/name, as in {constants.ENDPOINT}/meta-llama/Llama-3.1-8B); "
            f"if it is private, log in with {LOGIN}."
        )
    if kind == DISABLED:
        return f"{repo_id} has been disabled on the Hub by its owner: use another copy."
    if kind == HUB_ERROR:
        status = getattr(getattr(error, "response", None), "status_code", "an error")
        return (
            f"the Hub answered {status} when asked for {repo_id}: "
            f"{str(error).splitlines()[0]}. Try again later."
        )
    return None


def download_hint(repo_id: str, revision: str | None = None, cache: bool = False) -> str:
    """The command that fetches ``repo_id`` at ``revision``: into the Hugging Face cache
    (``cache``: what transformers, TRL and lm-eval load from offline), else into a folder
    to write in place of the Hub id (mergekit asks the Hub even for a cached model). The
    paper's OLMo 2 checkpoints come with ``ftt-fetch-checkpoints``, saved as it used them."""
    from mergekit_ftt.paper_checkpoints import CHECKPOINTS, REPO_ID, folder_name

    pinned = f" --revision {revision}" if revision else ""
    if cache:
        return f"`hf download {repo_id}{pinned}`"
    names = [name for name, step in CHECKPOINTS.items() if step == revision]
    if repo_id == REPO_ID and names:  # M4' is typed M4p
        name = names[0].replace("'", "p")
        return (
            f"`ftt-fetch-checkpoints {name} --dest checkpoints`, which writes "
            f"checkpoints/{folder_name(names[0])}"
        )
    return f"`hf download {repo_id}{pinned} --local-dir models/{repo_id.split('/')[-1]}`"


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
