"""What a finetuning_transfer merge changes of mergekit's defaults, and only those."""

from __future__ import annotations

import os

import click
import pytest
import torch
from click.testing import CliRunner
from mergekit.common import parse_kmb
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions, add_merge_options

from mergekit_ftt.merge_options import transfer_options


def recipe(method: str) -> MergeConfiguration:
    models = [{"model": "ft", "parameters": {"role": "source_finetuned"}}]
    models.append({"model": "sb", "parameters": {"role": "source_base"}})
    return MergeConfiguration.model_validate(
        {"merge_method": method, "base_model": "target", "models": models}
    )


def options_from_command_line(method: str, *args: str) -> MergeOptions:
    """The options a mergekit command passes to run_merge, through the plugin's defaults."""
    seen = []

    @click.command()
    @add_merge_options
    def command(merge_options: MergeOptions) -> None:
        seen.append(transfer_options(recipe(method), merge_options))

    result = CliRunner().invoke(command, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return seen[0]


def test_transfer_writes_250_mb_shards_on_two_writer_threads_and_merges_on_two_by_default():
    threads = min(2, os.cpu_count() or 1)
    before = torch.get_num_threads()
    try:
        options = options_from_command_line("finetuning_transfer")
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert options.async_write is True
    assert options.write_threads == 2
    assert options.out_shard_size == parse_kmb("250M")
    assert options.num_threads == threads


@pytest.mark.parametrize(
    ("args", "async_write", "shard_size", "threads"),
    [
        (["--out-shard-size", "5B", "-j", "2"], True, "5B", 2),
        (["--no-async-write", "-j", "1"], False, "250M", 1),
        (["--async-write", "--out-shard-size", "1B"], True, "1B", min(2, os.cpu_count() or 1)),
        (["--async-write", "--out-shard-size", "500M", "-j", "2"], True, "500M", 2),
    ],
)
def test_options_given_on_the_command_line_are_kept(args, async_write, shard_size, threads):
    options = options_from_command_line("finetuning_transfer", *args)
    assert options.async_write is async_write
    assert options.out_shard_size == parse_kmb(shard_size)
    assert options.num_threads == threads


def test_other_methods_and_python_callers_keep_mergekits_defaults():
    assert options_from_command_line("task_arithmetic") == MergeOptions()
    assert transfer_options(recipe("finetuning_transfer"), MergeOptions()) == MergeOptions()
