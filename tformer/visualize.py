"""``python -m tformer.visualize``: see :mod:`tformer.visualization.cli`."""

import sys

from tformer.cli_errors import run_cli
from tformer.visualization.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(run_cli(main))
