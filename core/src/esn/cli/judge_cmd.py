"""``esn judge``: run one installed judge on audio files and print a table or JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from esn.cli.argtypes import command_line
from esn.cli.ui import console, status
from esn.errors import EsnError

if TYPE_CHECKING:
    from esn.judges import Audio, Judgement


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``judge``."""
    p = sub.add_parser("judge", help="judge audio files with an installed judge (emotion or quality)")
    p.add_argument("files", nargs="+", type=Path, help="audio files (any rate, mono or stereo)")
    p.add_argument("--judge", required=True, help="judge name, see `esn plugins list`")
    p.add_argument("--model", default=None, help="checkpoint directory/file or hub id (default: the judge's)")
    p.add_argument("--source", nargs="+", type=Path, default=None,
                   help="unconverted source audio, one per file (judges that compare, e.g. lalm_judge)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps (default cpu)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="judge load option, e.g. mapping=five (values parsed as JSON when they can be)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_judge)


def parse_options(pairs: list[str]) -> dict:
    """``["mapping=five", "threads=2"]`` -> ``{"mapping": "five", "threads": 2}`` (JSON values where they parse)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise EsnError(f"--option {pair!r}: expected KEY=VALUE, e.g. mapping=five")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def read_files(paths: list[Path]) -> list[Audio]:
    """Read audio files as :class:`esn.judges.Audio`, with a clear error for a missing or unreadable one."""
    from esn.audio import read_audio
    from esn.judges import Audio

    audios = []
    for path in paths:
        data, rate = read_audio(path)  # clear EsnError for missing or unreadable files
        audios.append(Audio(data, rate, name=str(path)))
    return audios


def cmd_judge(args: argparse.Namespace) -> int:
    """``esn judge``: label (or score) audio files with an installed judge."""
    from rich.table import Table
    from rich.text import Text

    from esn.devices import check_device
    from esn.plugins import registry

    with command_line():  # before any file is read or model loaded
        cls = registry().judge(args.judge)
        check_device(args.device)
        options = parse_options(args.option)
        cls.check_options(options)
        if args.source is not None and len(args.source) != len(args.files):
            raise EsnError(f"--source takes one file per audio file: {len(args.files)} files, "
                           f"{len(args.source)} sources")
    audios = read_files(args.files)
    sources = read_files(args.source) if args.source else None
    with status(f"loading judge {args.judge}..."):
        judge = cls.load(args.model, device=args.device, **options)
    with status(f"judging {len(audios)} file(s)..."):
        results = judge.judge(audios, sources=sources)
    rows = [row(a.name, r) for a, r in zip(audios, results, strict=True)]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    quality = cls.kind == "quality"
    table = Table(title=f"esn judge {args.judge}")
    for col in (("file", "MOS") if quality else ("file", "label", "top scores", "raw answer")):
        table.add_column(col)
    for r in rows:
        if quality:
            table.add_row(r["file"], f"{r['scores'].get('mos', float('nan')):.3f}")
        else:
            top = sorted(r["scores"].items(), key=lambda kv: -kv[1])[:3]
            table.add_row(r["file"], r["label"] or Text("unparseable", style="yellow"),
                          ", ".join(f"{k} {v:.2f}" for k, v in top), r["raw"][:40])
    console.print(table)
    return 0


def row(name: str, judgement: Judgement) -> dict:
    """One output row (file, label, scores, raw answer) of a judged file."""
    return {"file": name, "label": judgement.label, "scores": judgement.scores, "raw": judgement.raw}
