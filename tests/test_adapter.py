"""The mergekit adapter: what it changes in mergekit, what it leaves alone, how it undoes it,
and outputs that exist only once complete."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import OFFLINE_ENV, merge, transfer_recipe

from mergekit_ftt import mergekit_adapter


def test_other_merge_methods_reach_run_merge_untouched(llama, tmp_path):
    """A real linear merge through the wrapped ``run_merge``: mergekit's own ``run_merge``
    gets the very configuration and options objects (no transfer defaults), none of the
    transfer's code runs (no preflight, no staging, no card), and the output is byte for
    byte what the unwrapped ``run_merge`` writes. A profiler watches the real calls."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    mergekit_run_merge = getattr(run_merge, mergekit_adapter._MARK)  # the hook wrapped it
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(llama.model("target", 1)), "parameters": {"weight": 0.5}},
            {"model": str(llama.model("ft_a", 3)), "parameters": {"weight": 0.5}},
        ],
    }
    config = MergeConfiguration.model_validate(recipe)
    options = MergeOptions(quiet=True)
    unchanged = options.model_dump()
    threads = torch.get_num_threads()
    received, plugin_calls = [], set()

    def watch(frame, event, _argument):
        if event != "call":
            return
        if frame.f_code is mergekit_run_merge.__code__:
            received.append((frame.f_locals["merge_config"], frame.f_locals["options"]))
        module = frame.f_globals.get("__name__", "")
        if module.startswith("mergekit_ftt"):
            plugin_calls.add(f"{module}.{frame.f_code.co_name}")

    sys.setprofile(watch)
    try:
        run_merge(config, str(tmp_path / "wrapped" / "out"), options)
    finally:
        sys.setprofile(None)
    mergekit_run_merge(
        MergeConfiguration.model_validate(recipe), str(tmp_path / "plain" / "out"), options
    )

    assert len(received) == 1 and received[0][0] is config and received[0][1] is options
    assert options.model_dump() == unchanged and torch.get_num_threads() == threads
    transfer_steps = ("preflight.check_", "merge_options.", "outputs.", "card.")
    assert not [call for call in plugin_calls if any(s in call for s in transfer_steps)]
    wrapped, plain = tmp_path / "wrapped" / "out", tmp_path / "plain" / "out"
    assert sorted(p.name for p in (tmp_path / "wrapped").iterdir()) == ["out"]  # no staging
    files = sorted(p.name for p in plain.iterdir())
    assert "README.md" in files and sorted(p.name for p in wrapped.iterdir()) == files
    for name in files:
        assert (wrapped / name).read_bytes() == (plain / name).read_bytes(), name


def test_rollback_undoes_every_extension():
    code = (
        "import mergekit.merge, mergekit.common, mergekit.merge_methods as m\n"
        "from mergekit_ftt import mergekit_adapter as a\n"
        "a.extend_all()\n"
        "names = lambda: [x.spec.name for x in m.registered_methods()]\n"
        "patched = lambda: (hasattr(mergekit.merge.run_merge, a._MARK),"
        " hasattr(mergekit.common.ModelReference.lazy_loader, a._MARK))\n"
        "print('finetuning_transfer' in names(), patched())\n"
        "a.rollback()\n"
        "print('finetuning_transfer' in names(), patched())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=OFFLINE_ENV, capture_output=True, text=True
    )
    assert result.stdout.splitlines() == ["True (True, True)", "False (False, False)"], (
        result.stderr
    )


@pytest.fixture
def models(llama) -> tuple[Path, Path, Path]:
    """(target, source_base, fine-tuned) tiny Llama checkpoints."""
    return llama.model("target", 1), llama.model("source_base", 2), llama.model("ft_a", 3)


def staging_of(out: Path) -> Path:
    return out.with_name(f".{out.name}.incomplete")


@pytest.mark.slow
def test_an_output_folder_with_files_is_not_written_into(models, tmp_path):
    target, base, ft = models
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result, _ = merge(transfer_recipe(target, [(ft, 1.0)], base), tmp_path)
    assert result.returncode == 1
    assert "exists and is not an empty folder" in result.stderr
    assert "Traceback" not in result.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert not staging_of(out).exists()


def test_a_failed_async_write_stops_the_merge_at_the_next_shard(models, tmp_path, monkeypatch):
    """mergekit queues every full shard on its writer thread and raises a failed write at
    the end; the adapter waits for the previous write before the next shard, so a full disk
    stops the merge after one shard, and no queue of shards builds up in memory."""
    import safetensors.torch
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    target, base, ft = models
    attempts = []

    def full_disk(tensors, filename, metadata=None):
        attempts.append(filename)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    config = MergeConfiguration.model_validate(transfer_recipe(target, [(ft, 1.0)], base))
    options = MergeOptions(async_write=True, out_shard_size=1)  # one tensor per shard
    with pytest.raises(OSError, match="No space left on device"):
        run_merge(config, str(tmp_path / "out"), options)
    assert len(attempts) == 1
    assert not (tmp_path / "out").exists() and not staging_of(tmp_path / "out").exists()
