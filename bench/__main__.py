"""python -m bench: the comparison harness (see bench/cli.py)."""

import sys

from .cli import main

sys.exit(main())
