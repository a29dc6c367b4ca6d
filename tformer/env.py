"""``python -m tformer.env``: the environment report (see :mod:`tformer.env_report`)."""

import sys

from tformer.env_report import main

if __name__ == "__main__":
    sys.exit(main())
