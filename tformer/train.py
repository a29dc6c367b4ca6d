"""tformer's one training entry point: single process, DeepSpeed, or FSDP2 under torchrun.

    deepspeed tformer/train.py --config ds.json
    torchrun --nproc_per_node 2 tformer/train.py --config fsdp2.json
    python tformer/train.py --config ds.json --set run.steps=200

Arguments in, :mod:`tformer.training` does the work (see :mod:`tformer.cli.train`, also run as ``tformer train``).
"""

import os
import sys

# Run as a script, Python puts tformer/ itself first on sys.path, where tformer's subpackages
# (data, models, ...) would shadow top-level packages of the same names. Put the repository
# root there instead, so `import tformer` works even without an install.
if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from tformer.cli.errors import run_cli  # noqa: E402
from tformer.cli.train import build_parser, main, parse_args  # noqa: E402

__all__ = ["build_parser", "main", "parse_args"]

if __name__ == "__main__":
    run_cli(main)
