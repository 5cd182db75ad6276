"""What every command-line entry point shares: bad input is one stderr line and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from algorithms.errors import PruningError

from .errors import UsageError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (and exit 2), not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message}; see python {self.prog} --help\n")


def guarded(action: Callable[[], int], interrupted: str) -> int:
    """Run a CLI's body: bad input is one stderr line and exit 2, Ctrl-C a one-line note and exit 130; never a traceback for either."""
    try:
        return action()
    except (UsageError, PruningError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a path that cannot be read or written (permissions, a file where a folder should be, a full disk)
        if isinstance(error, BrokenPipeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error}; check the path and its permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
