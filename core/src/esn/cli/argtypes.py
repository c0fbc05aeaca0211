"""argparse types the command modules share (a bad value is argparse's one-line usage error, exit 2)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type of counts such as --threads: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value
