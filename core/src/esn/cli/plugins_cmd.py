"""``esn adapters list|tiny|check`` and ``esn plugins list``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.text import Text

from esn.cli.argtypes import command_line
from esn.cli.ui import console, print_table, status
from esn.errors import EsnError
from esn.plugins import registry


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``adapters list|tiny|check`` and ``plugins list``."""
    adapters = sub.add_parser("adapters", help="model adapters: list installed ones, write tiny checkpoints")
    asub = adapters.add_subparsers(dest="adapters_command", metavar="ACTION", required=True)
    lst = asub.add_parser("list", help="list installed adapters")
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lst.set_defaults(func=cmd_adapters_list)
    tiny = asub.add_parser("tiny", help="write a tiny random checkpoint of an adapter's model")
    tiny.add_argument("adapter", help="adapter name (`esn adapters list`)")
    tiny.add_argument("directory", type=Path, help="a new or empty folder for the checkpoint")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    tiny.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    tiny.set_defaults(func=cmd_adapters_tiny)
    chk = asub.add_parser("check", help="what an adapter's real model needs against what is installed (no weights load)")
    chk.add_argument("adapter", nargs="*", help="adapter names (default: every installed adapter)")
    chk.add_argument("--json", action="store_true", help="print a JSON list instead of tables")
    chk.set_defaults(func=cmd_adapters_check)

    plugins = sub.add_parser("plugins", help="installed plugins and what they register")
    psub = plugins.add_subparsers(dest="plugins_command", metavar="ACTION", required=True)
    plst = psub.add_parser("list", help="list plugins")
    plst.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plst.set_defaults(func=cmd_plugins_list)


def adapter_rows() -> list[dict]:
    """One row per installed adapter: name, distribution, version, architectures, streams, description."""
    reg = registry()
    rows = []
    for name, cls in sorted(reg.adapters.items()):
        info = reg.origin[("adapters", name)]
        rows.append(
            {
                "name": name,
                "distribution": info.distribution,
                "version": info.version,
                "architectures": list(cls.architectures),
                "streams": list(cls.streams),
                "description": cls.description,
            }
        )
    return rows


def cmd_adapters_list(args: argparse.Namespace) -> int:
    """``esn adapters list``."""
    from rich.table import Table

    rows = adapter_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        console.print(Text.assemble("No adapter is installed. Install one, e.g. ", ("esn-qwen-omni", "bold"),
                                    " (docs/install.md)."))
        return 0
    table = Table(title="esn adapters")
    for col in ("name", "distribution", "version", "architectures", "streams"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["distribution"], r["version"], ", ".join(r["architectures"]), ", ".join(r["streams"]))
    print_table(table)
    return 0


def cmd_adapters_tiny(args: argparse.Namespace) -> int:
    """``esn adapters tiny``: the adapter's tiny random checkpoint, into a new or empty folder."""
    with command_line():
        cls = registry().adapter(args.adapter)
    check_checkpoint_folder(args.directory, force=args.force)
    with status(f"writing a tiny {args.adapter} checkpoint"):
        path = cls.write_tiny(args.directory, seed=args.seed)
    console.print(Text.assemble(f"wrote a tiny random {args.adapter} checkpoint to ", (str(path), "bold")))
    return 0


_STATUS_STYLE = {"ok": "green", "optional": "dim", "opt-in": "yellow", "missing": "bold red", "mismatch": "bold red"}


def cmd_adapters_check(args: argparse.Namespace) -> int:
    """``esn adapters check``: exit 0 when every named adapter's needs are met, 1 when something is missing
    (a report, not an error)."""
    from rich.table import Table

    from esn.requirements import check

    reg = registry()
    names = args.adapter or sorted(reg.adapters)
    with command_line():
        classes = [reg.adapter(name) for name in names]
    reports = [check(cls) for cls in classes]
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=2))
        return 0 if all(r.ok for r in reports) else 1
    for report in reports:
        table = Table(title=f"{report.adapter}: what {report.model} needs", title_justify="left")
        for col in ("need", "required", "installed", "status", "why"):
            table.add_column(col, overflow="fold")
        for f in report.findings:
            style = _STATUS_STYLE.get(f.status, "")
            table.add_row(f.need, f.required, f.found, Text(f.status, style=style), f.why)  # plain text, no markup
        console.print(table)
        if report.install:
            console.print("install what is missing:")
            console.print(report.install, soft_wrap=True)
        else:
            console.print(f"{report.adapter}: everything its model needs is installed")
        if report.install_all and report.install_all != report.install:
            console.print("the whole stack its model was written for:")
            console.print(report.install_all, soft_wrap=True)
    return 0 if all(r.ok for r in reports) else 1


def check_checkpoint_folder(directory: Path, *, force: bool = False) -> None:
    """A folder a checkpoint may be written to: new, or empty (or anything, with ``force``) and not a file."""
    if directory.exists() and not directory.is_dir():
        raise EsnError(f"{directory} is a file; give a folder for the checkpoint")
    if not force and directory.is_dir() and any(directory.iterdir()):
        n = sum(1 for _ in directory.iterdir())
        raise EsnError(f"folder {directory} is not empty ({n} entries); give a new or empty folder, "
                       "or --force to write into it (files of the same name are replaced)")
    parent = next((p for p in directory.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise EsnError(f"{directory}: {parent} is a file, not a folder")


def cmd_plugins_list(args: argparse.Namespace) -> int:
    """``esn plugins list``."""
    from rich.table import Table

    reg = registry()
    rows = []
    for info in reg.plugins:
        provides = sorted(f"{kind[:-1]}:{name}" for (kind, name), src in reg.origin.items() if src is info)
        rows.append({"name": info.name, "distribution": info.distribution, "version": info.version,
                     "hooks": info.hooks, "provides": provides})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="esn plugins")
    for col in ("name", "distribution", "version", "provides"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["distribution"], r["version"], ", ".join(r["provides"]))
    print_table(table)
    return 0
