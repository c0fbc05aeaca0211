"""The background writer of the record stage, and the throughput a stage reports from its batches' times."""

from __future__ import annotations

import threading
import time

import pytest
from esn.pipeline.parallel import BatchTime, Claims, _throughput, steady_rate
from esn.pipeline.writer import BackgroundWriter
from rich.console import Console


def test_writes_run_in_order_on_another_thread_and_count_only_once_written():
    main = threading.get_ident()
    written, counted = [], []
    gate = threading.Event()

    def write(i):
        if i == 0:
            gate.wait(5)  # the first write is slow: the caller goes on meanwhile
        written.append((i, threading.get_ident()))

    with BackgroundWriter() as writer:
        for i in range(4):
            writer.submit(lambda i=i: write(i), lambda s, t, i=i: counted.append((i, threading.get_ident(), s)))
            if i == 0:
                assert written == [] and counted == []  # submitted, not written: not done either
                gate.set()
    assert [i for i, _ in written] == [0, 1, 2, 3]
    assert all(ident != main for _, ident in written)
    assert [(i, ident) for i, ident, _ in counted] == [(i, main) for i in range(4)]  # `then` on the caller's thread
    assert all(s >= 0 for *_, s in counted)


def test_the_queue_holds_one_write_behind_the_one_in_progress():
    release = threading.Event()
    writer = BackgroundWriter()
    writer.submit(lambda: release.wait(5), lambda s, t: None)  # in progress
    time.sleep(0.2)
    assert writer.submit(lambda: None, lambda s, t: None) < 0.5  # waits in the queue
    threading.Timer(0.6, release.set).start()
    assert writer.submit(lambda: None, lambda s, t: None) >= 0.3  # no room until the first one ends
    writer.close()


def test_a_failed_write_is_raised_in_the_caller_and_the_later_ones_are_dropped():
    written, counted = [], []

    def fail():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"), BackgroundWriter() as writer:
        writer.submit(lambda: written.append(0), lambda s, t: counted.append(0))
        writer.submit(fail, lambda s, t: counted.append(1))
        writer.submit(lambda: written.append(2), lambda s, t: counted.append(2))
    assert written == [0] and counted == [0]  # the batch after the failure is not written, not counted


def test_an_error_of_the_batch_loop_still_finishes_the_queued_writes():
    written = []
    with pytest.raises(KeyError), BackgroundWriter() as writer:
        writer.submit(lambda: (time.sleep(0.2), written.append(0)), lambda s, t: written.append("counted"))
        raise KeyError("generate failed")
    assert written == [0, "counted"]


def test_claims_note_when_each_batch_was_claimed_and_written():
    finished = []
    claims = Claims(iter("ab"), lambda: finished.append(1), rank=3, t0=time.perf_counter())
    assert next(claims) == "a" and next(claims) == "b"
    claims.done(20, generate=1.0, store=0.5)
    claims.done(10, at=time.perf_counter(), generate=2.0)
    first, second = claims.times
    assert (first.rank, first.conversions, first.phases) == (3, 20, {"generate": 1.0, "store": 0.5})
    assert first.start <= second.start <= first.end <= second.end and finished == [1, 1]


def test_steady_rate_counts_from_every_ranks_first_batch_on():
    # one process: a 10 s first batch (warm-up), then one batch of 20 every 5 s
    alone = [BatchTime(0, 0.0, 10.0, 20, {})] + [BatchTime(0, 10.0 + 5 * i, 15.0 + 5 * i, 20, {}) for i in range(3)]
    assert steady_rate(alone, 25.0) == pytest.approx(4.0)
    # two ranks, one warms up slower: the window opens when both have a batch done; a batch counts with
    # the part of it inside the window
    two = [BatchTime(0, 0, 10, 20, {}), BatchTime(0, 10, 15, 20, {}), BatchTime(0, 15, 20, 20, {}),
           BatchTime(1, 0, 12, 20, {}), BatchTime(1, 12, 17, 20, {}), BatchTime(1, 17, 22, 20, {})]
    assert steady_rate(two, 22.0) == pytest.approx((20 * 3 / 5 + 20 + 20 + 20) / 10)
    assert steady_rate(two[:4], 22.0) is None  # rank 1 did one batch: no steady state to speak of
    assert steady_rate([], 1.0) is None


def test_the_stage_prints_its_rates_and_each_ranks_steps(caplog):
    console = Console(record=True, width=60)
    times = [BatchTime(r, 5.0 * i, 5.0 * i + 5, 20, {"generate": 4.0 + r, "store": 1.0}) for r in (0, 1) for i in range(3)]
    with caplog.at_level("INFO", logger="esn.pipeline.parallel"):
        _throughput(console, "record (2 ranks)", 120, 15.0, times)
    lines = console.export_text().splitlines()
    assert lines == ["record (2 ranks): 120 conversions in 15.0 s, 8.00 conversions/s; after every rank's first batch "
                     "8.00 conversions/s",
                     "record rank 0: 3 batches; median s per batch: generate 4.00, store 1.00",
                     "record rank 1: 3 batches; median s per batch: generate 5.00, store 1.00"]
    assert len(caplog.records) == 6
    assert caplog.records[4].getMessage() == ("record batch: rank 1 #1, claimed 5.00 s, done 10.00 s, 20 conversions; "
                                              "generate 5.000, store 1.000")
