"""Write a batch's results on a background thread while the next batch generates.

Record ends each batch with host work that needs no GPU: statistics to numpy, dtype conversion,
safetensors serialization, sha256, a write with fsync and a rename. Done in line, the GPU idles for
all of it; on this thread it overlaps the next ``generate`` (numpy, hashlib and file I/O release the
GIL). At most one write waits behind the one in progress, so at most two batches' statistics are held
on the host. Writes run one at a time in the order submitted, each as atomic as before, and a batch
counts as done (``then``, run on the caller's thread) only once its files are in place: a process
killed mid-write loses only the batches whose files are not complete, which a resumed run redoes.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

_STOP = object()


class BackgroundWriter:
    """A writer thread with a queue of one. ``submit(write, then)`` runs ``write()`` on the thread and,
    once it returned, ``then(seconds, finished)`` on the caller's thread (at a later ``submit``, ``poll``
    or the end of the ``with`` block), with the write's duration and its ``time.perf_counter()`` at the
    end. An error of a write is raised in the caller at the next of these; the
    writes queued after it are dropped (their batches are not done, and a resumed run does them)."""

    def __init__(self, name: str = "esn-writer"):
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._finished: deque[tuple[Callable[[float, float], None], float, float]] = deque()
        self._failed = False  # set by the thread on the first failed write, never cleared
        self._error: BaseException | None = None  # that write's error, until raised in the caller
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (job := self._queue.get()) is not _STOP:
            if self._failed:
                continue  # drop the rest, but keep taking jobs so that submit never blocks for ever
            write, then = job
            t0 = time.perf_counter()
            try:
                write()
            except BaseException as exc:  # raised again in the caller's thread
                self._error, self._failed = exc, True
                continue
            t1 = time.perf_counter()
            self._finished.append((then, t1 - t0, t1))

    def submit(self, write: Callable[[], None], then: Callable[[float, float], None]) -> float:
        """Queue ``write``; returns the seconds spent waiting for room in the queue (the writer lagging).
        ``then`` of this write runs at a later call, never inside this one."""
        self.poll()
        t0 = time.perf_counter()
        self._queue.put((write, then))
        return time.perf_counter() - t0

    def poll(self) -> None:
        """Run ``then`` of the writes finished so far; raise the error of a failed write (once)."""
        while self._finished:
            then, seconds, finished = self._finished.popleft()
            then(seconds, finished)
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Wait for the queued writes, stop the thread, then ``poll``."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self.poll()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        # The batch loop failed: still finish the writes already queued (what was computed is kept), and
        # let the loop's own error through; a write error now would only be the second problem.
        with contextlib.suppress(BaseException):
            self.close()
