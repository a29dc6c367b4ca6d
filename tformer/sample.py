"""``python -m tformer.sample``: text from a trained DecoderLM (see :mod:`tformer.generation.sampling`)."""

from tformer.cli_errors import run_cli
from tformer.generation.sampling import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    run_cli(main)
