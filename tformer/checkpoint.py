"""``python -m tformer.checkpoint verify DIR``: check a run's checkpoints (see
:mod:`tformer.training.checkpoint_verify`)."""

import sys

from tformer.cli_errors import run_cli
from tformer.training.checkpoint_verify import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(run_cli(main))
