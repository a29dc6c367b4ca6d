"""``python -m tformer COMMAND ...``: the ``tformer`` command without its console script."""

import sys

from tformer.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m tformer"))
