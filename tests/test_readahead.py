"""Reading a merge's inputs ahead: the right bytes, in mergekit's order, within the window."""

from __future__ import annotations

import threading
import time

import torch
import yaml
from mergekit.config import MergeConfiguration
from safetensors import safe_open

from mergekit_ftt import readahead
from mergekit_ftt.readahead import Extent, Readahead, merge_plan, request_step, tensor_extents


def test_extents_hold_each_tensors_bytes(llama):
    folder = llama.model("target", seed=1)
    extents = tensor_extents(folder)
    assert extents
    for name, extent in extents.items():
        with open(extent.path, "rb") as file:
            file.seek(extent.start)
            raw = bytearray(file.read(extent.end - extent.start))
        with safe_open(extent.path, framework="pt") as handle:
            tensor = handle.get_tensor(name)
        assert torch.equal(torch.frombuffer(raw, dtype=tensor.dtype).view(tensor.shape), tensor)


def test_plan_follows_the_order_mergekit_merges_in(llama, tmp_path, monkeypatch):
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    folders = [llama.model(name, seed) for name, seed in (("target", 1), ("ft", 2), ("sb", 3))]
    recipe = {
        "merge_method": "finetuning_transfer",
        "base_model": str(folders[0]),
        "dtype": "bfloat16",
        "models": [
            {"model": str(folders[1]), "parameters": {"role": "source_finetuned"}},
            {"model": str(folders[2]), "parameters": {"role": "source_base"}},
        ],
    }
    merged_in_order = []
    original = Readahead.reached

    def record(self, name):
        merged_in_order.append(name)
        original(self, name)

    monkeypatch.setattr(Readahead, "reached", record)
    config = MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(recipe)))
    run_merge(config, str(tmp_path / "out"), MergeOptions(quiet=True))

    plan = merge_plan(folders)
    assert merged_in_order == [name for name, _ in plan]
    assert all(len(extents) == 3 for _, extents in plan)


def test_reads_at_most_a_window_ahead_of_the_merge(tmp_path):
    shard = tmp_path / "shard.bin"
    shard.write_bytes(bytes(10 * readahead.STEP_BYTES))
    step = readahead.STEP_BYTES
    # Ten one-step tensors, each in two "inputs" (two halves of the file).
    plan = [
        (f"t{i}", [Extent(str(shard), i * step // 2, (i + 1) * step // 2)] * 2) for i in range(10)
    ]
    requested: list[int] = []
    changed = threading.Condition()

    def advise(fd, offset, length):
        with changed:
            requested.append(offset)
            changed.notify_all()

    def wait_for(count):
        with changed:
            changed.wait_for(lambda: len(requested) >= count, timeout=10)
        time.sleep(0.2)  # and nothing more arrives
        return len(requested)

    reader = Readahead(lambda: plan, window_bytes=3 * step, advise=advise, step_bytes=step)
    reader.start()
    assert wait_for(6) == 6  # tensors 0–2: one step of each input each
    reader.reached("t4")  # the merge moved on: tensor 3 is skipped, 4–6 read
    assert wait_for(12) == 12
    assert requested[6:] == [4 * step // 2] * 2 + [5 * step // 2] * 2 + [6 * step // 2] * 2
    reader.reached("unknown")  # a name outside the plan changes nothing
    assert wait_for(12) == 12
    reader.close()


def test_requests_are_as_large_as_the_disks_readahead(tmp_path):
    step = request_step(tmp_path)
    assert readahead.STEP_BYTES <= step <= readahead.MAX_STEP_BYTES
    assert step % 4096 == 0
