"""``python -m mergekit_ftt.sweep``: the same as ``ftt-sweep``."""

import sys

from mergekit_ftt.sweep.cli import main

sys.exit(main())
