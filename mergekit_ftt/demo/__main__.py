"""``python -m mergekit_ftt.demo``: the same as ``ftt-demo``."""

import sys

from mergekit_ftt.demo.cli import main

sys.exit(main())
