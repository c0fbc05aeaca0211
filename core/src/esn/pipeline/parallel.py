"""How several processes share a stage's batches: a static shard ``K/N`` takes the batches ``k`` with
``k % N == K``. Batch files are named after ``k`` alone, so N shards write exactly the files of one process.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from esn.errors import EsnError

SHARDED_STAGES = ("record", "evaluate")  # lists of independent batches; select and report run once


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)``: the process takes the batches ``k`` with ``k % N == K``."""
    k, sep, n = str(text).partition("/")
    try:
        if not sep:
            raise ValueError
        kk, nn = int(k), int(n)
    except ValueError:
        raise EsnError(f"--shard {text!r}: expected K/N with integers K and N, e.g. 0/2 and 1/2 for two "
                       "processes") from None
    if nn < 1 or not 0 <= kk < nn:
        raise EsnError(f"--shard {text!r}: need N >= 1 and 0 <= K < N (the shards of N=2 are 0/2 and 1/2)")
    return kk, nn


def in_shard(shard: tuple[int, int] | None, k: int) -> bool:
    """Whether batch ``k`` belongs to ``shard`` (every batch does when there is none)."""
    return shard is None or k % shard[1] == shard[0]


def shard_tag(shard: tuple[int, int] | None) -> str:
    """`` K/N`` for progress bars and messages; empty for an unsharded process."""
    return "" if shard is None else f" {shard[0]}/{shard[1]}"


def progress_bar(console: Console) -> Progress:
    """The bar of a stage's batches, with the time left."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
    )
