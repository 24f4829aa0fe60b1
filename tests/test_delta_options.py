"""ftt-delta extract's options: flags generated from one model; an option that would have
no effect with the others is refused in one line before any model is read."""

from __future__ import annotations

import pytest
from helpers import run_cli

from mergekit_ftt.delta.options import ExtractOptions

REFUSED = {
    ("--density", "0.3"): "--density takes effect only with --compress magnitude or --compress dare, not with --compress none",
    ("--rescale",): "--rescale takes effect only with --compress magnitude or --compress dare, not with --compress none",
    ("--compress", "magnitude", "--density", "0.3", "--seed", "3"): "--seed takes effect only with --compress dare, not with --compress magnitude",
    ("--compress", "dare", "--density", "0.3", "--scale", "matrix"): "--scale takes effect only with --compress sign, not with --compress dare",
    ("--compress", "sign", "--no-exact"): "--no-exact takes effect only with --compress none, not with --compress sign",
    ("--compress", "magnitude"): "--compress magnitude needs --density in (0, 1], the fraction of elements kept (e.g. --density 0.1).",
}  # fmt: skip


@pytest.mark.parametrize("flags", REFUSED, ids=" ".join)
def test_options_without_effect_are_refused(flags, tmp_path):
    out = tmp_path / "delta"
    result = run_cli(
        "ftt-delta", "extract", str(out), "--finetuned", "nowhere/a", "--base", "nowhere/b", *flags
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith(f"ftt-delta: error: {REFUSED[flags]}")
    assert result.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_sizes_and_defaults_come_from_the_model():
    options = ExtractOptions(shard_size="500MB", compress="dare", density=0.5)
    assert int(options.shard_size) == 500_000_000
    assert options.exact and options.source_hash and options.rescale is None
