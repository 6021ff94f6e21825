"""`python -m profiling` is `python -m profiling.bench`."""

import sys

from .bench import main

sys.exit(main(prog="python -m profiling"))
