"""The ``tformer`` command: one subcommand per user-facing job.

    tformer --help                       # every subcommand, one line each
    tformer train --config ds.json       # = python tformer/train.py --config ds.json
    tformer sample --help                # the subcommand's own options
    python -m tformer sample --help      # the same, without the console script

Each subcommand is one module here, ``tformer/cli/<command>.py``, exposing
``build_parser(prog)`` and ``main(argv, prog=...)``: argparse in, the library's functions out.
It is imported only when its subcommand runs, so ``tformer --help`` stays fast (no torch
import). Everything after the subcommand's name goes to that module's own parser, so
``tformer X --help`` prints all of X's options, under a usage line naming the command as typed
(``tformer X`` or ``python -m tformer X``). Every command runs through
:func:`tformer.cli.errors.run_cli`: a user error is one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from typing import NamedTuple


class Command(NamedTuple):
    module: str
    summary: str


# One module per command, in this package. A module an install lacks (a plugin, a newer
# tformer's command) fails with a one-line error naming it.
COMMANDS: dict[str, Command] = {
    "train": Command("tformer.cli.train", "train a model from a config (plain, DeepSpeed or torchrun)"),
    "sample": Command("tformer.cli.sample", "generate text from a trained DecoderLM"),
    "classify": Command("tformer.cli.classify", "label texts with a trained classifier"),
    "embed": Command("tformer.cli.embed", "sentence embeddings from a trained encoder"),
    "transcribe": Command("tformer.cli.transcribe", "speech to text with a trained model"),
    "ablate": Command("tformer.cli.ablate", "run an ablation grid of training runs"),
    "visualize": Command("tformer.cli.visualize", "plot training runs and attention maps"),
    "checkpoint": Command("tformer.cli.checkpoint", "verify a run's checkpoints and export (checkpoint verify DIR)"),
    "env": Command("tformer.cli.env", "report versions, GPUs, backends and the CUDA build (--json)"),
    "selftest": Command("tformer.cli.selftest", "check and time every kernel path on this device; print the table"),
}


def build_parser(prog: str = "tformer") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="tformer: fused attention kernels and a transformer training system.",
        epilog=f"Run '{prog} COMMAND --help' for a command's options.",
        formatter_class=functools.partial(argparse.HelpFormatter, width=120))
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    # argparse sizes the summary column by the metavar and the names at one indent less than it
    # prints them; a metavar this long keeps every command and its summary on one line.
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND [ARGS]", required=True)
    for name, command in COMMANDS.items():
        # No options here: the command's own parser (imported only when it runs) reads the rest,
        # --help included.
        subparsers.add_parser(name, help=command.summary, description=command.summary, add_help=False)
    return parser


def _version() -> str:
    import tformer

    return tformer.__version__


def load_command(name: str):
    """The module behind subcommand ``name``; SystemExit(2) with one line when it cannot import."""
    module_name = COMMANDS[name].module
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        # Only a missing command module is "not installed"; a missing dependency inside it is named as such.
        if error.name is not None and module_name.startswith(error.name) and error.name.startswith("tformer"):
            print(f"error: 'tformer {name}' is not available in this install: its module {module_name} does not "
                  f"exist (it comes with a newer tformer)", file=sys.stderr)
        else:
            print(f"error: 'tformer {name}' needs {error.name!r}, which is not installed ({error})", file=sys.stderr)
        raise SystemExit(2) from error


def dispatch(argv: list[str] | None = None, *, prog: str = "tformer") -> int:
    """Run the subcommand named first in ``argv`` with the rest; its usage lines say ``{prog} {command}``."""
    parser = build_parser(prog)
    args, rest = parser.parse_known_args(argv)
    result = load_command(args.command).main(rest, prog=f"{prog} {args.command}")
    # Commands return an exit status, None or data (train returns its metrics); only ints are statuses.
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None, *, prog: str = "tformer") -> int:
    """The console script (and ``python -m tformer``, with that ``prog``): user errors of any
    subcommand print one ``error: ...`` line, exit 2 (``--debug`` or ``TFORMER_DEBUG=1`` shows the
    traceback)."""
    from tformer.cli.errors import run_cli

    return run_cli(functools.partial(dispatch, prog=prog), argv)

