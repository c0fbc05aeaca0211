"""What the command modules share to check arguments: argparse types (a bad value is argparse's one-line
usage error, exit 2) and :func:`command_line`, the scope of checks whose EsnError is a usage error too."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

from esn.errors import EsnError, UsageError


def positive_int(text: str) -> int:
    """argparse type of counts such as --threads: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


@contextlib.contextmanager
def command_line() -> Iterator[None]:
    """Checks of what the command line says: an EsnError raised inside is a ``UsageError`` (exit 2).
    Only checks of the arguments themselves go inside, never reading a file, a model or a run directory."""
    try:
        yield
    except UsageError:
        raise
    except EsnError as exc:
        raise UsageError(str(exc)) from exc
