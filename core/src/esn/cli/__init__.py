"""The ``esn`` command. Each command group lives in its own module with an ``add_commands(sub)``.

User mistakes (``EsnError``) print one line on stderr and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from rich.console import Console

from esn import __version__
from esn.errors import EsnError

# Modules under esn.cli that contribute commands, in help order.
COMMAND_MODULES = ("plugins_cmd", "model_cmd", "judge_cmd", "pipeline_cmd")

err_console = Console(stderr=True, soft_wrap=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esn",
        description="Find and steer emotion-sensitive neurons in speech-generative audio-language models.",
    )
    parser.add_argument("--version", action="version", version=f"esn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"esn.cli.{name}").add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning
        try:
            return int(args.func(args) or 0)
        except EsnError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
            return 2
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            return 130


def _show_warning(message, category, filename, lineno, file=None, line=None):
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False)


if __name__ == "__main__":
    sys.exit(main())
