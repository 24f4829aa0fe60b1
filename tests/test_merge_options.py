"""What a finetuning_transfer merge changes of mergekit's defaults, and only those."""

from __future__ import annotations

import click
import pytest
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


def test_transfer_writes_in_the_background_in_1_gb_shards_by_default():
    options = options_from_command_line("finetuning_transfer")
    assert options.async_write is True
    assert options.out_shard_size == parse_kmb("1B")


@pytest.mark.parametrize(
    ("args", "async_write", "shard_size"),
    [
        (["--out-shard-size", "5B"], True, "5B"),
        (["--no-async-write"], False, "1B"),
        (["--async-write", "--out-shard-size", "500M"], True, "500M"),
    ],
)
def test_options_given_on_the_command_line_are_kept(args, async_write, shard_size):
    options = options_from_command_line("finetuning_transfer", *args)
    assert options.async_write is async_write
    assert options.out_shard_size == parse_kmb(shard_size)


def test_other_methods_and_python_callers_keep_mergekits_defaults():
    assert options_from_command_line("task_arithmetic") == MergeOptions()
    assert transfer_options(recipe("finetuning_transfer"), MergeOptions()) == MergeOptions()
