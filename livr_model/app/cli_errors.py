"""How the command-line tools report a mistake in what the user gave: one line on stderr in
argparse's form (``livr-train: error: <message>``) and exit status 2, no traceback.

Which errors are the user's is decided where the input is read, not guessed at the top. Code that
reads arguments, config and grid files, data, checkpoints, the base model or output directories
runs inside ``user_input()``, which marks a ValueError or OSError raised there (their messages name
the argument or ``file:line``) as the user's to fix. The same types raised anywhere else (the
training loop, evaluation, figures) and every other type are bugs and keep their traceback.
``--debug`` shows the traceback of a marked error too. Marking keeps the exception's type, so
library callers of ``train()`` and friends catch what they always caught.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from typing import Callable, Optional, Sequence

# argparse's exit status for a usage error; ours match it.
EXIT_USAGE = 2
USER_ERRORS = (ValueError, OSError)
_MARK = "_livr_user_input"


@contextmanager
def user_input(*kinds: type):
    """Mark errors of ``kinds`` (default ``USER_ERRORS``) raised inside as the user's input errors."""
    try:
        yield
    except (kinds or USER_ERRORS) as error:
        setattr(error, _MARK, True)
        raise


def is_user_error(error: BaseException) -> bool:
    return getattr(error, _MARK, False)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="on an error in the input, show the full Python traceback instead of one line")


def run_command(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int],
                argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and run ``body(args)``; an input error marked by ``user_input()`` becomes one
    line on stderr and ``EXIT_USAGE`` (unless ``--debug``)."""
    args = parser.parse_args(argv)
    try:
        return body(args)
    except USER_ERRORS as error:
        if getattr(args, "debug", False) or not is_user_error(error):
            raise
        sys.stdout.flush()
        # One line whatever the message: some come from libraries that wrap theirs (the hub's, PyYAML's).
        print(f"{parser.prog}: error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        return EXIT_USAGE
