"""The convention every ftt-* command follows (mergekit_ftt.cli): errors, flags, logs."""

from __future__ import annotations

import argparse
import io
import logging
import os
import subprocess
import sys

import pytest

from mergekit_ftt.cli import Stages, add_options, entry_point, library_logs, options_from
from mergekit_ftt.errors import FttError
from mergekit_ftt.eval.options import BackendOptions, RunOptions


def test_entry_point_prints_one_error_line_and_exits_2(capsys):
    @entry_point("ftt-x")
    def main(argv):
        raise FttError(f"no such thing {argv[0]!r}; use another")

    assert main(["y"]) == 2
    assert capsys.readouterr().err == "ftt-x: error: no such thing 'y'; use another\n"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_options(parser, RunOptions)
    add_options(parser, BackendOptions)
    return parser.parse_args(argv)


def test_flags_come_from_the_options_models_in_both_spellings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for folder in ("a", "b"):  # --include-path must name folders
        (tmp_path / folder).mkdir()
    args = parse(
        "--batch_size", "8", "--include-path", "a", "--include_path", "b", "--limit", "0.5",
        "--apply-chat-template", "--fewshot_as_multiturn", "false", "--trust_remote_code",
        "--model_args", "max_length=64,dtype=bfloat16", "--backend", "vllm", "--seed", "42",
    )  # fmt: skip
    assert options_from(args, RunOptions) == RunOptions(
        backend="vllm",
        include_path=["a", "b"],
        limit=0.5,
        apply_chat_template=True,
        fewshot_as_multiturn=False,
    )
    assert options_from(args, BackendOptions) == BackendOptions(
        batch_size=8,
        trust_remote_code=True,
        model_args={"max_length": 64, "dtype": "bfloat16"},
        seed=42,
    )
    # Unset flags take the model's defaults, defined once there.
    assert options_from(parse(), BackendOptions) == BackendOptions()
    assert options_from(parse("--limit", "10"), RunOptions).limit == 10


def test_bad_values_name_the_flag():
    with pytest.raises(FttError, match="--tensor-parallel-size: Input should be a valid integer"):
        options_from(argparse.Namespace(tensor_parallel_size="two"), BackendOptions)
    with pytest.raises(SystemExit):
        parse("--backend", "sglang")  # argparse lists the choices


def test_library_logs_go_to_the_file_and_stage_lines_to_the_terminal(tmp_path):
    terminal = io.StringIO()
    say = Stages("ftt-x", stream=terminal)
    log_file = tmp_path / "x.log"
    before = logging.getLogger("transformers").handlers[:]
    with library_logs(log_file) as log:
        say("stage one")
        logging.getLogger("transformers.trainer").info("library chatter")
        print("{'loss': 1.0}")
        sys.stderr.write("a library's bar\n")
        os.write(2, b"a child process's complaint\n")
        assert log is not None
    assert terminal.getvalue().endswith("] stage one\n")
    text = log_file.read_text()
    for line in ("library chatter", "{'loss': 1.0}", "a library's bar", "child process"):
        assert line in text
    assert logging.getLogger("transformers").handlers == before  # restored
    with library_logs(log_file, verbose=True) as log:
        assert log is None


def test_a_closed_pipe_ends_a_command_quietly(tmp_path):
    """What `ftt-X … | head -1` does: every command's entry point stops with 141 and no
    BrokenPipe traceback once the reader has gone."""
    script = (
        "from mergekit_ftt.cli import entry_point\n"
        "@entry_point('ftt-x')\n"
        "def run(argv):\n"
        "    for i in range(10**6):\n"
        "        print('line', i)\n"
        "raise SystemExit(run([]))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path
    )
    assert process.stdout.readline() == b"line 0\n"
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141
    assert stderr == ""
    assert list(tmp_path.iterdir()) == []
