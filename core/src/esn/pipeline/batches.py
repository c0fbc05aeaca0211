"""The unit of work: batches cut from a fixed, ordered attempt list, and seeds derived from stable ids.

Both depend only on the attempt list and the run seed, never on which process runs a batch or when, so
an interrupted, resumed or sharded run computes exactly what one uninterrupted process computes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence


def chunks(items: Sequence, size: int) -> Iterator[tuple[int, Sequence]]:
    """``(k, items[k*size:(k+1)*size])`` for every batch ``k``."""
    for k, start in enumerate(range(0, len(items), size)):
        yield k, items[start : start + size]


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (the same on every machine and Python run)."""
    blob = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1
