"""``python -m tformer.ablate``: see :mod:`tformer.experiments.ablate`."""

import sys

from tformer.cli_errors import run_cli
from tformer.experiments.ablate import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(run_cli(main))
