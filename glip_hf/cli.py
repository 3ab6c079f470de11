"""What the command-line scripts share: how a user error and a run that stops on purpose are reported.

A mistake in the configuration (a ``ValueError``, or a ``FileNotFoundError`` / ``FileExistsError`` /
``NotADirectoryError`` / ``IsADirectoryError`` about a path, each naming the field and the fix) is printed as one
line on stderr and the script exits with status 2, as argparse does; ``--debug`` (or ``GLIP_HF_DEBUG=1``) shows the
full traceback instead. A run stopped by a preemption signal or by too many non-finite steps raises ``RunStopped``
after it has left its checkpoints in order; the scripts print its one-line message and exit with its code. Any other
exception is a bug and keeps its traceback. ``OneLineErrorParser`` gives a bad flag the same one line, without
argparse's usage block above it.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
CONFIG_ERROR_EXIT = 2  # argparse's status for a bad command line
DEBUG_FLAG = "--debug"
DEBUG_ENV = "GLIP_HF_DEBUG"


class RunStopped(Exception):
    """Training stopped before its last step, on purpose, with everything saved that should be.

    Args:
        message: one line saying why, what was saved and how to go on.
        exit_code: the process exit status (128 + signal number after a signal, as shells report it).
        show: whether this process prints the message; a stop every process decided together is said once, by
            the main process.
    """

    def __init__(self, message: str, exit_code: int = 1, show: bool = True):
        super().__init__(message)
        self.exit_code = exit_code
        self.show = show


def one_line(error: BaseException | str) -> str:
    """The error's message on a single line (a library's multi-line message is joined)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines) or type(error).__name__


class OneLineErrorParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose errors are one line, ``prog: error: message``, with exit status 2.

    argparse prints its usage block above the message; the message already names the flag and the fix, and
    ``--help`` (printed as usual) lists the flags.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(CONFIG_ERROR_EXIT, f"{self.prog}: error: {one_line(message)}\n")


def run_cli(main: Callable[[list[str]], object], argv: list[str] | None = None, prog: str | None = None) -> None:
    """Run ``main(argv)`` as a script does: user errors as one line and exit status 2, ``RunStopped`` with its code.

    Args:
        main: the script's work; it receives ``argv`` without ``--debug``.
        argv: the command line after the script name; default ``sys.argv[1:]``.
        prog: the name the messages start with; default the running script's.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no", "off")
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    prog = prog or os.path.basename(sys.argv[0])
    try:
        main(argv)
    except RunStopped as stop:
        if debug:
            traceback.print_exc()
        if stop.show:
            print(f"{prog}: {one_line(stop)}", file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"{prog}: error: {one_line(error)} ({DEBUG_FLAG} for the traceback)", file=sys.stderr, flush=True)
        sys.exit(CONFIG_ERROR_EXIT)
