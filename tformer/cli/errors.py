"""One way for every tformer command to fail on bad input: ``error: <message>`` on one line of
stderr and exit status 2, no traceback (``--debug`` or ``TFORMER_DEBUG=1`` shows it).

Each command module keeps its ``main(argv)`` plain (it raises); the entry points wrap it::

    tformer.cli.dispatch -> run_cli(command.main, argv)

What counts as a user error: :class:`~tformer.schema.UsageError` (and its subclasses, e.g. a damaged checkpoint
or a locked run folder), ``ValueError`` (tformer's ``ConfigError`` is one; ops and loaders raise
it naming the argument), ``OSError`` (a missing file, a full disk) and
:class:`~tformer.optional.MissingDependency` (a feature whose pip extra is not installed).
Anything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import os
import sys

from tformer.optional import MissingDependency
from tformer.schema import UsageError

DEBUG_FLAG = "--debug"
DEBUG_ENV = "TFORMER_DEBUG"


__all__ = ["USER_ERRORS", "UsageError", "error_line", "run_cli"]

USER_ERRORS = (UsageError, ValueError, OSError, MissingDependency)


def debug_requested(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def error_line(error: BaseException) -> str:
    """The one line printed for ``error``: its message, newlines folded."""
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)  # no "[Errno 28]"
    message = " ".join(text.split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename and str(error.filename) not in message:
        message = f"{message}: {error.filename}"
    return message if message.startswith("error: ") else f"error: {message}"


def run_cli(main, argv: list[str] | None = None):
    """Call ``main(argv)`` (``argv`` without ``--debug``; None: ``sys.argv[1:]``) and turn a user
    error into one ``error: ...`` line and ``SystemExit(2)``. Returns what ``main`` returns."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        return main(argv)
    except USER_ERRORS as error:
        if debug:
            raise
        print(error_line(error), file=sys.stderr, flush=True)
        raise SystemExit(2) from None
