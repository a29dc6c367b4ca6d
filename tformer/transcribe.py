"""``python -m tformer.transcribe``: speech to text with a trained asr model (see
:mod:`tformer.generation.transcribe`)."""

from tformer.cli_errors import run_cli
from tformer.generation.transcribe import main

if __name__ == "__main__":
    run_cli(main)
