"""Outputs that exist only once complete: a merge and ``ftt-delta extract`` killed while
they write, then run again, then run once more after they finished."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import OFFLINE_ENV, load_weights, merge, run_cli, transfer_recipe


def staging_of(out: Path) -> Path:
    return out.with_name(f".{out.name}.incomplete")


def kill_once_writing(command: list[str], staging: Path) -> None:
    """Start ``command`` and SIGKILL it as soon as a file appears in ``staging``."""
    process = subprocess.Popen(
        command, env=OFFLINE_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if staging.is_dir() and any(p.is_file() for p in staging.iterdir()):
            break
        time.sleep(0.001)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read()
    assert any(staging.iterdir()), "killed before it wrote anything"


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_a_killed_extraction_leaves_nothing_that_looks_complete(llama, tmp_path):
    models = [
        "--finetuned",
        str(llama.model("ft_a", 3)),
        "--base",
        str(llama.model("source_base", 2)),
    ]
    out = tmp_path / "work" / "delta"
    flags = ["--no-source-hash", "--shard-size", "2KB"]  # many small files: a long write
    command = ["ftt-delta", "extract", str(out), *models, *flags]
    kill_once_writing(command, staging_of(out))
    assert not out.exists()  # only the hidden staging folder was ever written to

    rerun = run_cli(*command)
    assert rerun.returncode == 0, rerun.stderr
    log = out.with_name("delta.log")  # the command's log of library output, if any
    said = rerun.stdout + (log.read_text() if log.exists() else "")
    assert f"removing {staging_of(out)}, left by an interrupted run" in said
    assert {p.name for p in out.parent.iterdir()} - {log.name} == {"delta"}  # no strays

    straight = tmp_path / "straight" / "delta"
    result = run_cli("ftt-delta", "extract", str(straight), *models, *flags)
    assert result.returncode == 0, result.stderr
    assert files_of(out) == files_of(straight)  # bit for bit, the config and card included

    again = run_cli(*command)
    assert again.returncode == 0, again.stderr
    assert f"{out} is complete: it holds this delta; nothing to do" in again.stdout
    assert files_of(out) == files_of(straight)


@pytest.mark.slow
def test_a_folder_holding_another_delta_is_not_replaced_unasked(llama, tmp_path):
    base = ["--base", str(llama.model("source_base", 2)), "--no-source-hash"]
    out = tmp_path / "delta"
    first = run_cli(
        "ftt-delta", "extract", str(out), "--finetuned", str(llama.model("ft_a", 3)), *base
    )
    assert first.returncode == 0, first.stderr
    before = files_of(out)
    other = run_cli(
        "ftt-delta", "extract", str(out), "--finetuned", str(llama.model("ft_b", 4)), *base
    )
    assert other.returncode == 2
    assert f"ftt-delta: error: {out} holds another delta (" in other.stderr
    assert "choose a new folder or pass --overwrite." in other.stderr
    assert files_of(out) == before


@pytest.mark.slow
def test_a_killed_merge_leaves_nothing_that_looks_complete(llama, tmp_path):
    target, base, ft = (
        llama.model(n, s) for n, s in (("target", 1), ("source_base", 2), ("ft_a", 3))
    )
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(transfer_recipe(target, [(ft, 0.5)], base)))
    out = tmp_path / "out"
    # Many small shards: a long write, killed once the first shard is on disk.
    command = ["mergekit-yaml", str(recipe), str(out), "--out-shard-size", "2K"]
    kill_once_writing(command, staging_of(out))
    assert not out.exists()  # only the hidden staging folder was ever written to

    rerun = run_cli(*command)
    assert rerun.returncode == 0, rerun.stderr
    assert f"removing {staging_of(out)}, left by an interrupted run" in rerun.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yml"]

    (tmp_path / "b").mkdir()
    straight, straight_out = merge(transfer_recipe(target, [(ft, 0.5)], base), tmp_path / "b")
    assert straight.returncode == 0, straight.stderr
    rerun_weights, straight_weights = load_weights(out), load_weights(straight_out)
    assert rerun_weights.keys() == straight_weights.keys()
    for name, tensor in straight_weights.items():
        assert torch.equal(rerun_weights[name], tensor), name

    again = run_cli(*command)
    assert again.returncode == 0, again.stderr
    assert again.stderr.endswith(
        f"mergekit-ftt: {out} is complete: it holds this recipe's finished merge (its "
        "mergekit_config.yml matches); nothing to do. Delete the folder to merge again.\n"
    )
