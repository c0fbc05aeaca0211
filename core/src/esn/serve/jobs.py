"""Queueing a conversion on the app's batcher and waiting for its outcome: shared by ``/v1/convert``
(``esn.serve.app``) and the OpenAI-compatible routes (``esn.serve.openai_api``)."""

from __future__ import annotations

import asyncio
import io
import time

import soundfile as sf
from fastapi import Request

from esn.serve.batcher import Batcher, QueueFull
from esn.serve.convert import Job, Outcome
from esn.serve.errors import RequestError
from esn.serve.metrics import Metrics


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (after the body has been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def submit(request: Request, job: Job, metrics: Metrics) -> asyncio.Future:
    """Queue ``job`` on the app's batcher; 429 ``queue_full`` when the queue is at its limit."""
    batcher: Batcher = request.app.state.batcher
    try:
        return batcher.submit(job)
    except QueueFull:
        metrics.conversions.labels("queue_full").inc()
        raise RequestError(429, "queue_full", f"{batcher.queue.maxsize} conversions are already waiting; "
                           "try again shortly", headers={"Retry-After": "1"}) from None


async def await_outcome(request: Request, job: Job, future: asyncio.Future, started: float, metrics: Metrics,
                        *, watch_disconnect: bool = True) -> Outcome | None:
    """The job's successful outcome; None if the client disconnected first (watched unless the caller
    watches itself, as a streamed response does); RequestError on timeout or a failed conversion. Leaving
    (cancelled included) cancels the future, so the batcher skips the job, or drops its row's answer if
    it already runs."""
    waits = {future}
    gone = asyncio.ensure_future(_disconnected(request)) if watch_disconnect else None
    if gone is not None:
        waits.add(gone)
    left = max(0.0, job.timeout_s - (time.monotonic() - started))
    try:
        done, _ = await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if gone is not None:
            gone.cancel()
        if not future.done():
            future.cancel()
    if future not in done:
        if gone is not None and gone in done:
            metrics.conversions.labels("disconnected").inc()
            return None
        metrics.conversions.labels("timeout").inc()
        raise RequestError(504, "timeout", f"no answer within {job.timeout_s:g} s "
                           f"({request.app.state.batcher.depth} waiting); "
                           "try again later or with a longer timeout")
    outcome: Outcome = future.result()
    metrics.queue_seconds.observe(outcome.extra.get("queue_s", 0.0))
    if outcome.error is not None:
        metrics.conversions.labels(outcome.error.code).inc()
        raise outcome.error
    metrics.conversions.labels("ok").inc()
    return outcome


def wav_bytes(outcome: Outcome) -> bytes:
    """The outcome's audio as a 16-bit PCM wav file."""
    buf = io.BytesIO()  # 16-bit PCM, as `esn convert` writes it: the same samples give the same bytes
    sf.write(buf, outcome.result.waveform, outcome.result.sample_rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()
