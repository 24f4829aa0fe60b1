"""Save OLMo 2 7B intermediate checkpoints to local folders, as the paper did.

    ftt-fetch-checkpoints --list
    ftt-fetch-checkpoints M4 M5 --dest checkpoints

Each checkpoint is a revision of ``allenai/OLMo-2-1124-7B``. It is downloaded into the
Hugging Face cache with ``snapshot_download`` (which resumes partial downloads), loaded,
and saved in bfloat16 with its tokenizer, the pad token set to the EOS token (the paper's
``save_model_class.py``). A folder is written under a temporary name and renamed when
complete, so an interrupted run leaves no folder that looks finished; finished folders are
skipped on the next run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mergekit_ftt.cli import entry_point
from mergekit_ftt.errors import FttError
from mergekit_ftt.paper_checkpoints import CHECKPOINTS, REPO_ID, checkpoint_name, folder_name

# Only the files a transformers checkpoint needs (the repos also hold other formats).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]
COMPLETE_MARKER = "ftt_fetch.json"


def format_table(dest: Path) -> str:
    rows = [f"{'name':<5} {'revision of ' + REPO_ID:<44} folder"]
    rows += [
        f"{name:<5} {revision:<44} {dest / folder_name(name)}"
        for name, revision in CHECKPOINTS.items()
    ]
    return "\n".join(rows)


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def download(revision: str, repo_id: str = REPO_ID) -> Path:
    """Download (or resume downloading) one revision into the HF cache; return its path."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError as error:
        raise FttError(
            f"cannot download {repo_id}@{revision}: the Hugging Face Hub is unreachable "
            "(or HF_HUB_OFFLINE=1 is set) and the revision is not in the local cache. "
            "Connect to the internet (and unset HF_HUB_OFFLINE), then run the same command "
            "again; finished checkpoints are skipped and partial downloads resume."
        ) from error
    except HfHubHTTPError as error:  # gated, no such revision, 5xx: one line that says so
        from mergekit_ftt import hub

        message = hub.explain(error, repo_id, revision=revision)
        raise FttError(message or f"the Hub refused {repo_id}@{revision}") from error


def save_bf16_with_pad_eos(snapshot: Path, folder: Path, provenance: dict) -> Path:
    """Save ``snapshot`` to ``folder`` in bfloat16 with pad token = EOS, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_ftt.outputs import StagedOutput

    model = AutoModelForCausalLM.from_pretrained(snapshot, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    tokenizer.pad_token = tokenizer.eos_token
    # replace: an unmarked folder is the leftover of an older tool (is_complete said no).
    with StagedOutput(folder, replace=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / COMPLETE_MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
    return folder


def fetch(name: str, dest: Path, repo_id: str = REPO_ID) -> Path:
    """Fetch one checkpoint of the table into ``dest``; skip it if already complete."""
    name = checkpoint_name(name)
    folder = dest / folder_name(name)
    if is_complete(folder):
        print(f"{name}: {folder} is complete, skipping", flush=True)
        return folder
    revision = CHECKPOINTS[name]
    print(f"{name}: downloading {repo_id}@{revision}", flush=True)
    snapshot = download(revision, repo_id)
    print(f"{name}: saving bfloat16 copy to {folder}", flush=True)
    provenance = {"repo_id": repo_id, "revision": revision, "name": name, "dtype": "bfloat16"}
    return save_bf16_with_pad_eos(snapshot, folder, provenance)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftt-fetch-checkpoints",
        description=f"Save OLMo 2 7B intermediate checkpoints ({REPO_ID} revisions) "
        "locally in bfloat16 with tokenizer, pad token = EOS.",
    )
    parser.add_argument("names", nargs="*", help=f"checkpoint names: {', '.join(CHECKPOINTS)}")
    parser.add_argument("--dest", type=Path, default=Path("checkpoints"), help="output folder")
    parser.add_argument("--all", action="store_true", help="fetch every checkpoint of the table")
    parser.add_argument("--list", action="store_true", help="print the table and exit")
    return parser


@entry_point("ftt-fetch-checkpoints")
def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        print(format_table(args.dest))
        return
    names = list(CHECKPOINTS) if args.all else args.names
    if not names:
        parser.error("name at least one checkpoint (or --all); --list shows the table")
    names = [checkpoint_name(name) for name in names]  # all names checked before any download
    for index, name in enumerate(names, start=1):
        print(f"[{index}/{len(names)}] ", end="", flush=True)
        fetch(name, args.dest)


if __name__ == "__main__":
    sys.exit(main())
