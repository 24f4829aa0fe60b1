"""The one convention every ``ftt-*`` command follows.

- A problem the user can fix is an :class:`FttError` whose message names the problem and
  the fix; :func:`entry_point` prints it as ``PROG: error: MESSAGE`` and exits with 2,
  never with a traceback.
- Long work prints stage lines and one progress bar per long stage (:class:`Stages`);
  library logs and output (transformers, datasets, TRL, lm-eval, mergekit) go to a log file
  unless ``--verbose`` (:func:`library_logs`).
- Options live in one pydantic model; :func:`add_options` generates their flags and
  :func:`options_from` reads them back, as mergekit does with ``MergeOptions``.

Nothing here imports torch or a library it quiets: the commands' ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import sys
import time
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from mergekit_ftt.errors import FttError

if TYPE_CHECKING:
    from pydantic import BaseModel
    from tqdm import tqdm

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


Main = Callable[[Sequence[str] | None], int]


def entry_point(prog: str) -> Callable[[Callable[[Sequence[str] | None], int | None]], Main]:
    """Turn ``run(argv) -> int | None`` into a console-script ``main(argv=None) -> int``.

    :class:`FttError` becomes ``PROG: error: MESSAGE`` on stderr and exit status 2;
    Ctrl-C becomes ``PROG: interrupted`` and 130, a closed pipe (``| head``) a quiet 141.
    Anything else is a bug and keeps its
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
            except BrokenPipeError:
                # The reader (``| head``) has gone: stop quietly, as ``cat`` does. Point
                # stdout at devnull so the interpreter's final flush does not raise again.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 141

        return main

    return decorate


class Stages:
    """Stage lines ``[PROG   12 s] message`` and progress bars, on the terminal.

    The stream is fixed when the object is made, so stage lines and bars still reach the
    terminal while :func:`library_logs` sends everything else to the log file.
    """

    def __init__(self, prog: str, stream: IO[str] | None = None) -> None:
        self.prog = prog
        self.started = time.monotonic()
        self.stream = stream or sys.stdout

    def __call__(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{self.prog} {elapsed:5.0f} s] {message}", file=self.stream, flush=True)

    def print(self, text: str = "") -> None:
        """A line of the command's own output (a table, a path)."""
        print(text, file=self.stream, flush=True)

    def progress(self, total: int, description: str, unit: str = "step") -> tqdm:
        """One bar for a long stage; close it (or use it as a context manager) when done."""
        from tqdm import tqdm

        return tqdm(
            total=total,
            desc=f"  {description}",
            unit=unit,
            file=self.stream,
            dynamic_ncols=True,
            # Piped output gets a few updates, not one per step.
            mininterval=0.5 if self.stream.isatty() else 30,
            disable=False,  # not silenced with the libraries' bars
        )


@contextlib.contextmanager
def library_logs(
    log_file: str | os.PathLike | None, verbose: bool = False
) -> Iterator[IO[str] | None]:
    """Send the libraries' logs, warnings and printed output to ``log_file`` (appended)
    unless ``verbose``; yields the open log (for subprocesses), or None when nothing moves.
    A log file (and folders) this call made is removed when an :class:`FttError` or Ctrl-C
    ends the work: a refused run leaves nothing behind.

    With ``verbose`` (or no log file) nothing changes. Otherwise the library loggers write
    to the file instead of the terminal, Python warnings are logged there, ``sys.stdout``
    and ``sys.stderr`` point at it (TRL prints its loss lines, lm-eval draws its bars), so
    does file descriptor 2 (what child processes such as lm-eval's ``git`` calls write),
    and the Hugging Face libraries' own progress bars are switched off. Stage lines and bars
    of a :class:`Stages` made before entering still reach the terminal.
    """
    if verbose or log_file is None:
        yield None
        return
    path = Path(log_file)
    made = [folder for folder in (path, *path.parents) if not folder.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.open("a", encoding="utf-8", buffering=1)
    handler = logging.StreamHandler(log)
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
    sys.stderr.flush()
    saved_stderr_fd = os.dup(2)
    os.dup2(log.fileno(), 2)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(log),
            contextlib.redirect_stderr(log),
        ):
            warnings.simplefilter("default")
            _quiet_loaded_libraries()
            yield log
    except (FttError, KeyboardInterrupt):
        # A refused or interrupted run leaves nothing behind: not even the log it started.
        for made_path in made:
            if made_path == path:
                made_path.unlink(missing_ok=True)
            elif made_path.is_dir() and not any(made_path.iterdir()):
                made_path.rmdir()
        raise
    finally:
        os.dup2(saved_stderr_fd, 2)
        os.close(saved_stderr_fd)
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
        log.close()


def installed_command(name: str) -> str:
    """The path of console script ``name`` of this installation: beside the running Python
    first (a venv's ``bin/``, used without being on PATH), else on PATH."""
    import shutil

    beside = Path(sys.executable).parent / name
    found = str(beside) if os.access(beside, os.X_OK) else shutil.which(name)
    if found is None:
        raise FttError(
            f"{name} not found beside {sys.executable} nor on PATH: "
            "`pip install mergekit-ftt` installs it"
        )
    return found


def require_writable(path: str | os.PathLike, flag: str, folder: bool = False) -> None:
    """Refuse an output path that cannot be written, before the work starts: its nearest
    existing ancestor must be a folder this user may write in, and ``path`` itself, if it
    exists, a folder (``folder``) or a file (not ``folder``) that may be written."""
    path = Path(path)
    kind = "a folder" if folder else "a file name"
    if path.exists():
        if path.is_dir() != folder:
            raise FttError(f"{flag} {path} is {'a file' if folder else 'a folder'}; give {kind}")
        if not os.access(path, os.W_OK):
            raise FttError(f"{flag} {path} is not writable: give {kind} you may write")
        return
    existing = next(parent for parent in path.absolute().parents if parent.exists())
    if not existing.is_dir():
        raise FttError(f"{flag} {path}: {existing} is a file, not a folder; give another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FttError(
            f"{flag} {path}: cannot create it, {existing} is not writable; give {kind} "
            "in a folder you may write in"
        )


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


# --- options models -> command-line flags --------------------------------------------


def add_options(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """Add one flag per field of the pydantic ``model``, with the field's description as help.

    Each field ``batch_size`` is ``--batch-size`` and also ``--batch_size`` (lm-eval's and
    TRL's spelling). ``bool`` fields are switches; ``bool | None`` fields take an optional
    ``true|false`` (alone: true), and a ``bool`` field that defaults to true is
    ``--name``/``--no-name``; ``list`` fields repeat; ``Literal`` fields list their
    choices; ``dict`` fields take ``key=value`` pairs. Unset flags stay out of the namespace, so the model's defaults apply.
    """
    group = parser.add_argument_group(model.__name__, (model.__doc__ or "").split("\n\n")[0])
    for name, info in model.model_fields.items():
        flags = dict.fromkeys([f"--{name.replace('_', '-')}", f"--{name}"])
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        default = "" if info.default in (None, False, []) else f" (default: {info.default})"
        kwargs["help"] = (info.description or "") + default
        kwargs.update(_flag_kind(info.annotation, info.default))
        group.add_argument(*flags, **kwargs)


def options_from(args: argparse.Namespace, model: type[BaseModel]) -> Any:
    """The ``model`` built from the flags :func:`add_options` added; bad values are an FttError."""
    from pydantic import ValidationError

    given = {name: getattr(args, name) for name in model.model_fields if hasattr(args, name)}
    try:
        return model(**given)
    except ValidationError as error:
        problems = "; ".join(  # our validators' messages without pydantic's "Value error, "
            f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in error.errors()
        )
        raise FttError(problems) from None


def parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def _flag_kind(annotation: Any, default: Any = None) -> dict[str, Any]:
    """argparse settings for a field annotation (pydantic validates the value afterwards)."""
    origin = typing.get_origin(annotation)
    members = typing.get_args(annotation) if origin in (typing.Union, types.UnionType) else ()
    present = [member for member in members if member is not type(None)] or [annotation]
    if annotation is bool:  # a switch; one that is on by default also gets --no-NAME
        return {"action": argparse.BooleanOptionalAction if default is True else "store_true"}
    if present == [bool]:
        return {"nargs": "?", "const": True, "type": parse_bool, "metavar": "true|false"}
    if typing.get_origin(present[0]) is list:
        return {"action": "append"}
    if typing.get_origin(present[0]) is dict:
        return {"action": "extend", "nargs": "+", "metavar": "KEY=VALUE"}
    if typing.get_origin(present[0]) is Literal:
        return {"choices": typing.get_args(present[0])}
    if len(present) == 1 and present[0] in (int, float):
        return {"type": present[0]}
    return {}
