"""What every command-line entry point shares: bad input is one stderr line and exit status 2."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

from algorithms.errors import PruningError
from pipeline.errors import UsageError


def check_positive(flag: str, value: float) -> None:
    """A positive, finite number (nan compares false with everything, so `value <= 0` alone lets it through)."""
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"--{flag} must be a positive number, got {value}")


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the flags `argv` sets explicitly (a default value given by hand counts as asked for)."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (and exit 2), not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message}; see python {self.prog} --help\n")


def guarded(action: Callable[[], int], interrupted: str, quiet: Callable[[], bool] = lambda: False) -> int:
    """Run a CLI's body: bad input is one stderr line and exit 2, Ctrl-C a one-line note and exit 130; never a traceback
    for either.

    `quiet()`, asked when something goes wrong: keep the exit status, drop the line (the processes of a torchrun job
    other than rank 0, once they have joined it: rank 0 says it once).
    """

    def say(line: str) -> None:
        if not quiet():
            print(line, file=sys.stderr)

    try:
        return action()
    except (UsageError, PruningError) as error:
        say(f"error: {error}")
        return 2
    except OSError as error:
        # a path that cannot be read or written (permissions, a file where a folder should be, a full disk)
        if isinstance(error, BrokenPipeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        where = f"{error.filename}: " if error.filename else ""
        say(f"error: {where}{error.strerror or error}; check the path and its permissions")
        return 2
    except KeyboardInterrupt:
        say(interrupted)
        return 130
