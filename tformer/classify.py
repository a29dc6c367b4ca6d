"""``python -m tformer.classify``: labels for text from a trained classifier (see :mod:`tformer.generation.classify`)."""

import sys

from tformer.cli_errors import run_cli
from tformer.generation.classify import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(run_cli(main))
