"""``python -m tformer.embed``: rank a file's lines by similarity to a query (see :mod:`tformer.generation.embed`)."""

from tformer.cli_errors import run_cli
from tformer.generation.embed import main

if __name__ == "__main__":
    run_cli(main)
