"""The terminal every command writes to, and how loud it is (``esn --quiet`` / ``esn --verbose``).

``console`` (stdout) carries results: tables, JSON, decoded text, the paths of what was written.
``err_console`` (stderr) carries everything else: spinners, notes, warnings. ``--quiet`` silences
``err_console``, progress bars and warnings (results and errors still print); ``--verbose`` adds
library log messages, every warning and a traceback under each error. A command module imports the
consoles from here, never makes its own, so that both flags reach it. Both print plain text: style
goes through ``rich.text.Text``, never markup, so ``[...]`` in a path or an id is shown as written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

from rich.console import Console

QUIET, NORMAL, VERBOSE = -1, 0, 1

# Plain text (markup=False): messages carry user text (paths, ids, values) that may hold [...] or [/].
console = Console(markup=False, highlight=False)
err_console = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)
_silent = Console(quiet=True)
level = NORMAL
# --json: stdout carries the JSON alone, so progress bars and stage rules go to stderr.
json_output = False
# Under --quiet the libraries' own progress bars and notes go too (tqdm, huggingface_hub, transformers).
# They read these variables when they are imported, which in the esn command is after set_level.
QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def set_level(new: int) -> None:
    """Set the loudness for this process: ``QUIET``, ``NORMAL`` or ``VERBOSE``.

    ``QUIET`` also silences the progress bars of tqdm, huggingface_hub and transformers for the rest of
    the process (they cannot be switched back on once they have read the setting).
    """
    global level
    level = new
    err_console.quiet = new == QUIET
    if new == QUIET:
        os.environ.update(QUIET_ENV)
        hf = sys.modules.get("transformers.utils.logging")
        if hf is not None:  # imported already (in-process use): switch it directly
            hf.disable_progress_bar()
    if new == VERBOSE:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")


def set_json(on: bool) -> None:
    """``--json``: the command prints one JSON document on stdout; progress moves to stderr."""
    global json_output
    json_output = on


def progress_console() -> Console:
    """The console for progress bars and stage rules of long work (a silent one under ``--quiet``)."""
    return _silent if level == QUIET else err_console if json_output else console


@contextlib.contextmanager
def status(text: str) -> Iterator[None]:
    """A spinner with ``text`` on stderr while the block runs (nothing under ``--quiet``)."""
    if level == QUIET:
        yield
        return
    from rich.text import Text

    with err_console.status(Text(text)):  # a str would be read as markup by the spinner
        yield


def note(text) -> None:
    """One line of information (a str, printed as written, or a styled ``rich.text.Text``) on stderr
    (hidden under ``--quiet``)."""
    err_console.print(text)


def print_table(table) -> None:
    """Print a rich table on stdout at its natural width, wider than the terminal (or a pipe's 80
    columns) if a cell needs it: names and module paths are for copying, so they are never cut."""
    from rich.measure import Measurement

    for column in table.columns:
        column.no_wrap = True
    width = console.width
    console.width = max(width, Measurement.get(console, console.options.update(width=10_000), table).maximum)
    try:
        console.print(table, crop=False)
    finally:
        console.width = width
