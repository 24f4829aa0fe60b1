"""The one convention every ``ftt-*`` command follows.

- A problem the user can fix is an :class:`FttError` whose message names the problem and
  the fix; :func:`entry_point` prints it as ``PROG: error: MESSAGE`` and exits with 2,
  never with a traceback.
- Long work prints stage lines (:class:`Stages`) and progress bars; library logs
  (transformers, datasets, TRL, lm-eval, mergekit) go to a log file unless ``--verbose``
  (:func:`library_logs`).

Nothing here imports torch or a library it quiets: the commands' ``--help`` stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

# The loggers of the libraries our commands drive; their INFO chatter is for the log file.
LIBRARY_LOGGERS = (
    "transformers",
    "datasets",
    "trl",
    "accelerate",
    "lm-eval",
    "lm_eval",
    "mergekit",
    "huggingface_hub",
    "peft",
    "filelock",
    "urllib3",
    "httpx",
)


class FttError(Exception):
    """A problem the user can fix; the message names it and says how."""


Main = Callable[[Sequence[str] | None], int]


def entry_point(prog: str) -> Callable[[Callable[[Sequence[str] | None], int | None]], Main]:
    """Turn ``run(argv) -> int | None`` into a console-script ``main(argv=None) -> int``.

    :class:`FttError` becomes ``PROG: error: MESSAGE`` on stderr and exit status 2;
    Ctrl-C becomes ``PROG: interrupted`` and 130. Anything else is a bug and keeps its
    traceback.
    """

    def decorate(run: Callable[[Sequence[str] | None], int | None]) -> Main:
        @functools.wraps(run)
        def main(argv: Sequence[str] | None = None) -> int:
            try:
                return run(argv) or 0
            except FttError as error:
                print(f"{prog}: error: {error}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130

        return main

    return decorate


class Stages:
    """Stage lines ``[PROG   12 s] message``: what a long command is doing, and since when."""

    def __init__(self, prog: str, stream=None) -> None:
        self.prog = prog
        self.started = time.monotonic()
        self.stream = stream

    def __call__(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        print(
            f"[{self.prog} {elapsed:5.0f} s] {message}", file=self.stream or sys.stdout, flush=True
        )


@contextlib.contextmanager
def library_logs(log_file: str | os.PathLike | None, verbose: bool = False) -> Iterator[None]:
    """Send the libraries' logs and warnings to ``log_file`` (appended) unless ``verbose``.

    With ``verbose`` (or no log file) nothing changes. Otherwise the library loggers stop
    propagating to the terminal and write to the file, Python warnings are logged there,
    and the libraries' own progress bars are switched off (commands draw their own).
    """
    if verbose or log_file is None:
        yield
        return
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = {}
    for name in (*LIBRARY_LOGGERS, "py.warnings"):
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers[:], logger.propagate, logger.level)
        logger.handlers = [handler]
        logger.propagate = False
        logger.setLevel(logging.INFO)
    saved_env = {key: os.environ.get(key) for key in _QUIET_ENV}
    os.environ.update(_QUIET_ENV)
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            _quiet_loaded_libraries()
            yield
    finally:
        logging.captureWarnings(False)
        for name, (handlers, propagate, level) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        handler.close()


# Read by huggingface_hub, datasets and transformers when they draw a progress bar.
_QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


def _quiet_loaded_libraries() -> None:
    """Libraries already imported read their verbosity settings once: set them directly."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
