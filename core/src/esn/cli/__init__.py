"""The ``esn`` command. Each command group lives in its own module with an ``add_commands(sub)``.

Exit status: 0 done; 2 the command line is wrong (argparse's errors and ``UsageError``: a bad flag value,
flags that exclude each other, an unknown adapter or judge name); 1 anything else went wrong (an
``EsnError``: a config, file, model or run directory that does not fit; or an ``OSError`` esn did not name
itself, such as a full disk). Each prints one line on stderr, no traceback (``--verbose`` adds it).
``esn adapters check`` exits 1 when something its model needs is missing (a report, not an error).
Command modules stay cheap to import (``esn --help`` imports them all): torch, transformers and the
pipeline are imported inside the command functions, and output goes through :mod:`esn.cli.ui`.
Every command accepts ``-q/--quiet`` and ``-v/--verbose``, before or after its name. Messages carry user
text (paths, ids, values), so every console prints plain text: ``[...]`` is shown as written, never read
as rich markup.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
import warnings

from rich.console import Console
from rich.text import Text

from esn import __version__
from esn.cli import ui
from esn.errors import EsnError, UsageError

# Modules under esn.cli that contribute commands, in help order.
COMMAND_MODULES = ("plugins_cmd", "model_cmd", "judge_cmd", "pipeline_cmd", "serve_cmd")


def build_parser() -> argparse.ArgumentParser:
    """The ``esn`` argument parser with every command module's commands."""
    parser = argparse.ArgumentParser(
        prog="esn",
        description="Find and steer emotion-sensitive neurons in speech-generative audio-language models.",
    )
    parser.add_argument("--version", action="version", version=f"esn {__version__}")
    _loudness_flags(parser, default=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"esn.cli.{name}").add_commands(sub)
    for leaf in _leaves(parser):
        _loudness_flags(leaf, default=argparse.SUPPRESS)  # SUPPRESS: do not undo `esn -q CMD`
    return parser


def _loudness_flags(parser: argparse.ArgumentParser, default) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="no progress, spinners, notes or warnings; results and errors still print")
    group.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="library log messages, every warning, and a traceback with each error")


def _leaves(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers of the commands themselves (``esn adapters list``, not ``esn adapters``)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    return [leaf for a in subs for child in dict.fromkeys(a.choices.values()) for leaf in _leaves(child)]


def main(argv: list[str] | None = None) -> int:
    """Run ``esn`` with ``argv`` (default: the command line); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    ui.set_level(ui.QUIET if args.quiet else ui.VERBOSE if args.verbose else ui.NORMAL)
    ui.set_json(bool(getattr(args, "json", False)))
    with warnings.catch_warnings():
        warnings.simplefilter({ui.QUIET: "ignore", ui.NORMAL: "default", ui.VERBOSE: "always"}[ui.level])
        warnings.showwarning = _show_warning
        try:
            return int(args.func(args) or 0)
        except EsnError as exc:
            if ui.level == ui.VERBOSE:
                _errors.print(traceback.format_exc().rstrip())
            _errors.print(Text.assemble(("error:", "bold red"), f" {exc}"))
            return 2 if isinstance(exc, UsageError) else 1
        except OSError as exc:  # one esn did not name itself (it names the file, never a traceback)
            from esn.files import os_error

            if ui.level == ui.VERBOSE:
                _errors.print(traceback.format_exc().rstrip())
            _errors.print(Text.assemble(("error:", "bold red"), f" {os_error(exc, exc.filename or '?', 'use')}"))
            return 1
        except KeyboardInterrupt:
            _errors.print("interrupted", style="yellow")
            return 130


_errors = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)  # never quieted; plain text


def _show_warning(message, category, filename, lineno, file=None, line=None):
    ui.err_console.print(Text.assemble(("warning:", "yellow"), f" {message}"))


if __name__ == "__main__":
    sys.exit(main())
