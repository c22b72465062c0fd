"""User-facing errors: one exception type for problems a user can fix, and one wrapper for every command line.

Library code raises `VPTUserError` (a `ValueError`) for bad input it can name: a missing file, an unreadable image,
a record that breaks a rule. Every command-line entry point (`vpt-cli`, `vpt-eval` and `evaluation/evaluation.py`,
`scripts/prepare_data.py`, `scripts/prepare_weights.py`) runs through `run_cli`, which turns any error into one line
on stderr and exit status 2; ``--debug`` or ``VPT_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

__all__ = ["DEBUG_ENV", "VPTUserError", "one_line", "run_cli", "wants_debug"]

DEBUG_ENV = "VPT_DEBUG"
"""Environment variable that makes the command lines show tracebacks (``VPT_DEBUG=1``), like ``--debug``."""

USAGE_ERROR = 2


class VPTUserError(ValueError):
    """A problem with the user's input or files, with a message that names it and says what to do."""


def one_line(error: BaseException) -> str:
    """The error as one line: its message with white space folded; the type name where the message alone is vague."""
    message = " ".join(str(error).split())
    if isinstance(error, VPTUserError) and message:
        return message
    if isinstance(error, FileNotFoundError) and error.filename:
        return f"no such file or directory: {error.filename}"
    if isinstance(error, PermissionError) and error.filename:
        return f"permission denied: {error.filename}"
    name = type(error).__name__
    return f"{name}: {message}" if message else name


def wants_debug(argv: Sequence[str] | None) -> bool:
    """Whether tracebacks were asked for: ``--debug`` among the arguments, or ``VPT_DEBUG`` set to a true value."""
    arguments = sys.argv[1:] if argv is None else argv
    return "--debug" in arguments or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes", "on")


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None, prog: str = "") -> int:
    """Run a command's ``main(argv)``; an error becomes ``"<prog>: error: <one line>"`` on stderr and status 2.

    `SystemExit` (argparse's usage errors, ``--help``) and `KeyboardInterrupt` pass through. With ``--debug`` or
    ``VPT_DEBUG=1`` the error is raised as is, traceback and all.
    """
    try:
        status = main(argv)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as error:
        if wants_debug(argv):
            raise
        prog = prog or os.path.basename(sys.argv[0] or "vpt")
        hint = "" if isinstance(error, VPTUserError) else f" (--debug or {DEBUG_ENV}=1 shows the traceback)"
        print(f"{prog}: error: {one_line(error)}{hint}", file=sys.stderr)
        return USAGE_ERROR
    return 0 if status is None else int(status)
