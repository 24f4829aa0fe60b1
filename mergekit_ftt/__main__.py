"""``python -m mergekit_ftt yaml|multi ARGS``: mergekit's own commands, method registered.

The fallback for interpreters where the start-up ``.pth`` hook did not run (for example
a ``--target`` install outside site-packages): it installs the same hook explicitly,
then hands the arguments to ``mergekit-yaml`` or ``mergekit-multi`` unchanged.
"""

from __future__ import annotations

import importlib
import sys

from mergekit_ftt import hook

COMMANDS = {"yaml": "mergekit.scripts.run_yaml", "multi": "mergekit.scripts.multimerge"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["inspect"]:
        from mergekit_ftt.inspect.cli import main as inspect_main

        return inspect_main(argv[1:])
    if not argv or argv[0] not in COMMANDS:
        print(
            "usage: python -m mergekit_ftt {yaml,multi,inspect} ARGS...\n"
            "  yaml   runs mergekit-yaml with finetuning_transfer registered\n"
            "  multi  runs mergekit-multi with finetuning_transfer registered\n"
            "  inspect  runs ftt-inspect (will this delta transfer?)",
            file=sys.stderr,
        )
        return 2
    hook.install()
    command = importlib.import_module(COMMANDS[argv[0]])
    return command.main(args=argv[1:], prog_name=f"python -m mergekit_ftt {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
