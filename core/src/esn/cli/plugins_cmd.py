"""``esn adapters list|tiny`` and ``esn plugins list``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from esn.plugins import registry

console = Console()


def add_commands(sub: argparse._SubParsersAction) -> None:
    adapters = sub.add_parser("adapters", help="model adapters: list installed ones, write tiny checkpoints")
    asub = adapters.add_subparsers(dest="adapters_command", metavar="ACTION", required=True)
    lst = asub.add_parser("list", help="list installed adapters")
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lst.set_defaults(func=cmd_adapters_list)
    tiny = asub.add_parser("tiny", help="write a tiny random checkpoint of an adapter's model")
    tiny.add_argument("adapter")
    tiny.add_argument("directory", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_adapters_tiny)

    plugins = sub.add_parser("plugins", help="installed plugins and what they register")
    psub = plugins.add_subparsers(dest="plugins_command", metavar="ACTION", required=True)
    plst = psub.add_parser("list", help="list plugins")
    plst.add_argument("--json", action="store_true")
    plst.set_defaults(func=cmd_plugins_list)


def adapter_rows() -> list[dict]:
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
    rows = adapter_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        console.print("No adapter is installed. Install one, e.g. [bold]pip install esn-qwen-omni[/].")
        return 0
    table = Table(title="esn adapters")
    for col in ("name", "distribution", "version", "architectures", "streams"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["distribution"], r["version"], ", ".join(r["architectures"]), ", ".join(r["streams"]))
    console.print(table)
    return 0


def cmd_adapters_tiny(args: argparse.Namespace) -> int:
    cls = registry().adapter(args.adapter)
    path = cls.write_tiny(args.directory, seed=args.seed)
    console.print(f"wrote a tiny random {args.adapter} checkpoint to [bold]{path}[/]")
    return 0


def cmd_plugins_list(args: argparse.Namespace) -> int:
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
    console.print(table)
    return 0
