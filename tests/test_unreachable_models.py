"""Hub models that cannot be reached: one line naming the model and the fix, at once.

The messages are checked on the exceptions huggingface_hub itself raises: from a response
with the Hub's error headers run through its ``hf_raise_for_status``, and, end to end, from
a local HTTP server that answers like the Hub (``HF_ENDPOINT``) while the real
``mergekit-yaml`` runs. No network is needed, and none is used.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx2
import pytest
from helpers import OFFLINE_ENV, merge, nothing_written, run_cli, transfer_recipe
from huggingface_hub.errors import OfflineModeIsEnabled
from huggingface_hub.utils import hf_raise_for_status
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

from mergekit_ftt import hub
from mergekit_ftt.errors import FinetuningTransferError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# recipes/llama3_plus_delta31.yml's target, source_finetuned and source_base
PAPER_MODELS = (
    "meta-llama/Meta-Llama-3-8B",
    "meta-llama/Llama-3.1-8B-Instruct",
    "meta-llama/Llama-3.1-8B",
)

# What the Hub answers to HEAD /{repo}/resolve/{revision}/{file} for an anonymous client.
HUB_ANSWERS = {
    "/meta-llama/Meta-Llama-3-8B/resolve/main/config.json": (
        401,
        "GatedRepo",
        "Access to model meta-llama/Meta-Llama-3-8B is restricted. You must have access to "
        "it and be authenticated to access it. Please log in.",
    ),
    "/allenai/OLMo-2-1124-7B/resolve/no-such-step/config.json": (
        404,
        "RevisionNotFound",
        "Invalid rev id: no-such-step",
    ),
    "/meta-lama/Llama-3.1-8B/resolve/main/config.json": (
        401,
        "RepoNotFound",
        "Repository not found",
    ),
    "/busy-org/model/resolve/main/config.json": (503, None, "Service Unavailable"),
}


def hub_error(path: str) -> Exception:
    """The exception huggingface_hub raises for the Hub's answer to ``path``."""
    status, code, message = HUB_ANSWERS[path]
    headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}
    response = httpx2.Response(
        status, headers=headers, request=httpx2.Request("HEAD", f"https://huggingface.co{path}")
    )
    try:
        hf_raise_for_status(response)
    except Exception as error:
        return error
    raise AssertionError(f"huggingface_hub accepted {status}")


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setattr("huggingface_hub.constants.HF_STORED_TOKENS_PATH", str(tmp_path / "s"))


def test_gated_without_login(no_token):
    error = hub_error("/meta-llama/Meta-Llama-3-8B/resolve/main/config.json")
    message = hub.explain(error, "meta-llama/Meta-Llama-3-8B")
    assert message.startswith(
        "meta-llama/Meta-Llama-3-8B is a gated repository and this machine is not logged in"
    )
    assert "https://huggingface.co/meta-llama/Meta-Llama-3-8B" in message
    assert "`hf auth login` (`huggingface-cli login` before huggingface_hub 1.0)" in message


def test_gated_with_a_token_that_has_no_access(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    error = hub_error("/meta-llama/Meta-Llama-3-8B/resolve/main/config.json")
    message = hub.explain(error, "meta-llama/Meta-Llama-3-8B")
    assert "the Hugging Face account of this machine's token has no access" in message
    assert "request access at https://huggingface.co/meta-llama/Meta-Llama-3-8B" in message


def test_unknown_revision():
    error = hub_error("/allenai/OLMo-2-1124-7B/resolve/no-such-step/config.json")
    message = hub.explain(error, "allenai/OLMo-2-1124-7B", revision="no-such-step")
    assert message.startswith("allenai/OLMo-2-1124-7B has no revision 'no-such-step'")
    assert "https://huggingface.co/allenai/OLMo-2-1124-7B/tree/main" in message


def test_misspelled_id(no_token):
    error = hub_error("/meta-lama/Llama-3.1-8B/resolve/main/config.json")
    message = hub.explain(error, "meta-lama/Llama-3.1-8B")
    assert message.startswith(
        "meta-lama/Llama-3.1-8B is neither a local folder nor a repository on the Hub"
    )


def test_hub_trouble():
    busy = hub.explain(hub_error("/busy-org/model/resolve/main/config.json"), "busy-org/model")
    assert busy.startswith("the Hub answered 503 when asked for busy-org/model")


def test_a_bug_is_not_explained_away():
    assert hub.explain(KeyError("config"), "org/m") is None
    # no answer at all: the lookup (sources) says what serves instead
    assert hub.explain(httpx2.ConnectError("[Errno -2] Name or service not known"), "m") is None


class FakeHub(BaseHTTPRequestHandler):
    asked: ClassVar[list[str]] = []  # the paths requested, in order

    def do_HEAD(self):
        self.asked.append(self.path)
        if self.path == "/org/model/resolve/main/config.json":
            self.send_response(200)
            self.send_header("X-Repo-Commit", "0" * 40)
            self.send_header("ETag", '"0"')
            self.end_headers()
            return
        status, code, message = HUB_ANSWERS.get(self.path, (404, "EntryNotFound", "no file"))
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def online_env(endpoint: str, tmp_path: Path) -> dict[str, str]:
    """Hub access allowed, at ``endpoint``, with no token."""
    env = {key: value for key, value in OFFLINE_ENV.items() if "OFFLINE" not in key}
    return {**env, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": ""}


def refused_by_mergekit_yaml(recipe: Path | dict, tmp_path: Path, env: dict[str, str]) -> str:
    """Run the real mergekit-yaml; return its one error line (no traceback, no retries)."""
    if isinstance(recipe, dict):
        result, out = merge(recipe, tmp_path, env=env)
    else:
        out = tmp_path / "out"
        result = run_cli("mergekit-yaml", str(recipe), str(out), env=env)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Retrying" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert nothing_written(out)
    return line


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    ("repo_id", "outcome"), [("org/model", "reachable"), ("busy-org/model", "HfHubHTTPError")]
)
def test_probe_asks_once(repo_id, outcome, fake_hub, tmp_path):
    """One request, no retries: huggingface_hub's downloads retry a 503 for ~25 s."""
    FakeHub.asked.clear()
    code = (
        "import sys; from mergekit_ftt import hub\n"
        "try:\n    hub.probe(sys.argv[1], 'config.json'); print('reachable')\n"
        "except Exception as error:\n    print(type(error).__name__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, repo_id],
        env=online_env(fake_hub, tmp_path),
        capture_output=True,
        text=True,
    )
    assert result.stdout.strip() == outcome, result.stderr
    assert FakeHub.asked == [f"/{repo_id}/resolve/main/config.json"]


def test_offline_with_a_cached_copy_names_its_folder(llama, monkeypatch, tmp_path):
    """mergekit lists a Hub model's files on the Hub even when it is cached: the fix is the
    cached snapshot's folder."""
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(llama.model("ft_a", 3), snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("mergekit_ftt.sources._found_unreachable", None)  # set by the user
    recipe = transfer_recipe(llama.model("target", 1), [("org/tiny", 1.0)], llama.model("b", 2))
    with pytest.raises(FinetuningTransferError, match="HF_HUB_OFFLINE is set") as refused:
        run_merge(
            MergeConfiguration.model_validate(recipe),
            str(tmp_path / "out"),
            MergeOptions(quiet=True),
        )
    assert str(refused.value).startswith("org/tiny is in the Hugging Face cache, but mergekit")
    assert f"write its cached folder {snapshot} in its place" in str(refused.value)
    assert nothing_written(tmp_path / "out")


@pytest.mark.slow
def test_paper_recipe_without_network(tmp_path):
    """The seed's symptom: 28 s of retries, then a transformers OSError traceback."""
    endpoint = f"http://127.0.0.1:{closed_port()}"  # nothing listens: connection refused
    line = refused_by_mergekit_yaml(
        RECIPES / "llama3_plus_delta31.yml", tmp_path, online_env(endpoint, tmp_path)
    )
    assert line.startswith(f"Error: cannot load 3 models ({endpoint} cannot be reached, Connect")
    for model in PAPER_MODELS:  # all at once, each with the command that fetches it
        name = model.split("/")[1]
        assert (
            f"{model}: not a local folder; fetch it with `hf download {model} --local-dir "
            f"models/{name}` where the Hub is reachable, then write that folder in its place"
        ) in line


@pytest.mark.slow
def test_paper_recipe_with_hf_hub_offline(tmp_path):
    line = refused_by_mergekit_yaml(RECIPES / "llama3_plus_delta31.yml", tmp_path, OFFLINE_ENV)
    assert line.startswith("Error: cannot load 3 models (HF_HUB_OFFLINE is set): ")
    assert all(f"{model}: not a local folder; fetch it with" in line for model in PAPER_MODELS)


@pytest.mark.slow
def test_gated_model_through_mergekit_yaml(fake_hub, tmp_path):
    line = refused_by_mergekit_yaml(
        RECIPES / "llama3_plus_delta31.yml", tmp_path, online_env(fake_hub, tmp_path)
    )
    # The fake Hub has the gated target and nothing else: all three are named at once.
    assert line.startswith("Error: cannot load 3 models: meta-llama/Meta-Llama-3-8B: a gated ")
    assert (
        "meta-llama/Meta-Llama-3-8B: a gated repository; accept its terms at "
        f"{fake_hub}/meta-llama/Meta-Llama-3-8B (access is granted per account), then log in"
    ) in line
    assert "meta-llama/Llama-3.1-8B: the Hub repository has no config.json" in line


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("allenai/OLMo-2-1124-7B@no-such-step", "allenai/OLMo-2-1124-7B has no revision"),
        ("meta-lama/Llama-3.1-8B", "meta-lama/Llama-3.1-8B is neither a local folder nor a"),
    ],
    ids=["unknown revision", "misspelled id"],
)
def test_unknown_model_through_mergekit_yaml(model, expected, fake_hub, llama, tmp_path):
    recipe = transfer_recipe(llama.model("target", 1), [(model, 1.0)], llama.model("base", 2))
    line = refused_by_mergekit_yaml(recipe, tmp_path, online_env(fake_hub, tmp_path))
    assert line.startswith(f"Error: {expected}")


# --- what each of huggingface_hub's errors is, wherever it is wrapped --------------------


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (lambda: hub_error("/meta-llama/Meta-Llama-3-8B/resolve/main/config.json"), hub.GATED),
        (
            lambda: hub_error("/allenai/OLMo-2-1124-7B/resolve/no-such-step/config.json"),
            hub.NO_REVISION,
        ),
        (lambda: hub_error("/meta-lama/Llama-3.1-8B/resolve/main/config.json"), hub.NOT_FOUND),
        (lambda: hub_error("/busy-org/model/resolve/main/config.json"), hub.HUB_ERROR),
        (lambda: OfflineModeIsEnabled("offline"), hub.OFFLINE),
        (lambda: httpx2.ConnectError("[Errno -2] Name or service not known"), hub.NETWORK),
        (lambda: KeyError("config"), None),
    ],
    ids=["gated", "revision", "not found", "503", "offline", "no network", "a bug"],
)
def test_classify_huggingface_hub_errors(error, kind):
    assert hub.classify(error()) == kind


def wrapped(error: BaseException, outer: BaseException) -> BaseException:
    """``outer`` raised from ``error``, as transformers and datasets wrap huggingface_hub's."""
    try:
        try:
            raise error
        except BaseException as inner:
            raise outer from inner
    except BaseException as raised:
        return raised


def test_a_gated_repository_is_found_inside_the_wrappers():
    gated = hub_error("/meta-llama/Meta-Llama-3-8B/resolve/main/config.json")
    from_transformers = wrapped(gated, OSError("You are trying to access a gated repo."))
    assert hub.classify(from_transformers) == hub.GATED
    from datasets.exceptions import DatasetNotFoundError

    message = "Dataset 'Idavidrein/gpqa' is a gated dataset on the Hub."
    assert hub.classify(wrapped(gated, DatasetNotFoundError(message))) == hub.GATED
    assert hub.classify(DatasetNotFoundError(message)) == hub.GATED  # datasets' words alone


def test_a_gated_dataset_is_named_as_gated(no_token):
    from datasets.exceptions import DatasetNotFoundError

    from mergekit_ftt.sources import missing_dataset

    error = DatasetNotFoundError("Dataset 'Idavidrein/gpqa' is a gated dataset on the Hub.")
    missing = missing_dataset(error, "the dataset of task 'gpqa'")
    assert missing.problem == "a gated dataset"
    assert missing.message.startswith(
        "cannot load the dataset of task 'gpqa': Idavidrein/gpqa is a gated dataset on the "
        "Hub; accept its terms at https://huggingface.co/datasets/Idavidrein/gpqa, then log in"
    )


def test_every_missing_input_is_named_in_one_line(no_token, tmp_path, monkeypatch):
    """A gated model, a local folder that is not there and a model out of reach: one line."""
    from mergekit_ftt import sources

    monkeypatch.chdir(tmp_path)
    # online, as far as this process knows (a test before may have gone offline in-process)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    answers = {
        "meta-llama/Meta-Llama-3-8B": hub_error(
            "/meta-llama/Meta-Llama-3-8B/resolve/main/config.json"
        ),
        "org/far": httpx2.ConnectError("[Errno -2] Name or service not known"),
    }

    def probe(repo_id, filename, revision=None):
        raise answers[repo_id]

    monkeypatch.setattr(hub, "probe", probe)
    wanted = [sources.Wanted(name) for name in (*answers, "./not-trained-yet")]
    with pytest.raises(FinetuningTransferError) as refused:
        sources.require_models(wanted, FinetuningTransferError, cache_suffices=False)
    (line,) = str(refused.value).splitlines()
    assert line.startswith("cannot load 3 models: meta-llama/Meta-Llama-3-8B: a gated repository")
    assert "org/far: not a local folder, and https://huggingface.co cannot be reached" in line
    assert "`hf download org/far --local-dir models/far`" in line
    assert f"./not-trained-yet: no such local folder (looked in {tmp_path})" in line


def test_a_paper_checkpoint_is_fetched_with_ftt_fetch_checkpoints():
    hint = hub.download_hint("allenai/OLMo-2-1124-7B", "stage2-ingredient1-step7000-tokens30B")
    assert hint.startswith("`ftt-fetch-checkpoints M4p --dest checkpoints`")
    assert "checkpoints/M4prime" in hint
