"""``python -m mergekit_ftt yaml|multi|inspect|sweep|delta ARGS``: the commands, hook installed.

The fallback for interpreters where the start-up ``.pth`` hook did not run (for example
a ``--target`` install outside site-packages): it installs the same hook explicitly,
then hands the arguments to ``mergekit-yaml``, ``mergekit-multi`` or an ``ftt-*`` command
unchanged.
"""

from __future__ import annotations

import importlib
import sys

from mergekit_ftt import hook

COMMANDS = {"yaml": "mergekit.scripts.run_yaml", "multi": "mergekit.scripts.multimerge"}
# The plugin's own commands that read recipes, for the same interpreters.
FTT_COMMANDS = {
    "inspect": "mergekit_ftt.inspect.cli",
    "sweep": "mergekit_ftt.sweep.cli",
    "delta": "mergekit_ftt.delta.cli",
}
USAGE = """usage: python -m mergekit_ftt {yaml,multi,inspect,sweep,delta} ARGS...
  yaml     runs mergekit-yaml with finetuning_transfer registered
  multi    runs mergekit-multi with finetuning_transfer registered
  inspect  runs ftt-inspect (will this delta transfer?)
  sweep    runs ftt-sweep (which α?)
  delta    runs ftt-delta (extract or describe a stored delta)"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else None
    if command not in COMMANDS and command not in FTT_COMMANDS:
        print(USAGE, file=sys.stderr)
        return 2
    hook.install()
    if command in FTT_COMMANDS:
        return importlib.import_module(FTT_COMMANDS[command]).main(argv[1:])
    mergekit_command = importlib.import_module(COMMANDS[command])
    return mergekit_command.main(args=argv[1:], prog_name=f"python -m mergekit_ftt {command}")


if __name__ == "__main__":
    sys.exit(main())
