"""The record store's size as a choice: moments only when a configured selector takes them, compressed
counts, the size printed and a disk too small refused before any work, and a later select that needs
moments the store lacks refused with the way to get them. Small layouts; the paper-size figures are
``benchmarks/bench_store.py``."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from esn import plugins
from esn.errors import EsnError
from esn.hookpoints import HookPoint, Layout
from esn.pipeline import record, select
from esn.pipeline.config import parse_config
from esn.pipeline.files import atomic_write_json, seal
from esn.pipeline.run import Run
from esn.plugins import hookimpl, registry_with
from esn.selection import select_neurons
from esn.statistics import aggregate
from esn.store import AttemptRecord, AttemptStore, attempt_bytes
from rich.console import Console

LAYOUT = Layout([HookPoint("lm", 0, 8, "m.0"), HookPoint("lm", 1, 8, "m.1"), HookPoint("synth", 0, 6, "t.0")])
TARGETS = ["happy", "sad"]


def spread(probs, n_select, *, moments, **_):
    """A selector that takes moments: the neurons whose gate varies most under each emotion."""
    return [np.sort(np.argsort(-v, kind="stable")[:n_select]) for v in moments.var]


class SpreadPlugin:
    @hookimpl
    def register_selectors(self, register):
        register("spread", spread)


@pytest.fixture
def with_spread(monkeypatch):
    """The process registry with a third-party selector that needs moments (as an installed plugin gives it)."""
    monkeypatch.setattr(plugins, "_cached", registry_with(SpreadPlugin()))


def make_run(tmp_path: Path, selectors=("cas", "lap"), **record_options) -> Run:
    rows = ["path,transcript,speaker,split"]
    for k in range(6):
        sf.write(tmp_path / f"s{k}.wav", np.zeros(1600, np.float32), 16_000)
        rows.append(f"s{k}.wav,a b c,spk{k},identification")
    (tmp_path / "c.csv").write_text("\n".join(rows) + "\n")
    data = {"run_dir": str(tmp_path / "run"), "seed": 1, "model": {"source": "no-such-checkpoint",
                                                                   "streams": ["lm", "synth"]},
            "data": {"kind": "csv", "root": str(tmp_path / "c.csv")}, "judges": {"emotion": [{"name": "j"}]},
            "record": {"targets": TARGETS, "batch_size": 4, **record_options},
            "filter": {"require_match": True, "tau_wer": 0.5},
            "anchor": {"selector": selectors[0], "rate": 0.25, "c": 3}, "sweep": {"selectors": list(selectors)}}
    return Run(parse_config(data, base=tmp_path), console=Console(file=io.StringIO(), width=400))


def fill(run: Run, *, moments: bool, compress: bool, ids=None) -> AttemptStore:
    """The record stage's store of ``run`` (every attempt, or ``ids``), as ``_write_batch`` writes it."""
    store = AttemptStore(run.rundir.record, LAYOUT, architecture="tiny")
    rng = np.random.default_rng(0)
    attempts = [a for a in record.attempts(run) if ids is None or a.id in ids]
    recs = [AttemptRecord(a.id, a.target, "a b c", "a b c", {"label": a.target if k % 4 else "neutral"})
            for k, a in enumerate(attempts)]
    tokens = rng.integers(20, 40, size=(len(recs), 3))
    per = np.repeat(tokens, [8, 8, 6], axis=1)
    rates = np.where(np.array([a.target for a in attempts])[:, None] == "happy", 0.7, 0.3) * rng.random(22)
    counts = rng.binomial(per, rates)
    sums = counts * rng.random(counts.shape) if moments else None
    store.append(recs, counts, tokens, sums, None if sums is None else sums**2 + counts,
                 prompt_counts=counts // 3, prompt_tokens=tokens // 3, worker="b000000", compress=compress)
    return store


def test_moments_are_kept_only_when_a_configured_selector_takes_them(tmp_path, with_spread):
    assert record.keeps_moments(make_run(tmp_path).cfg) is False  # no built-in selector takes them
    assert record.keeps_moments(make_run(tmp_path, ("cas", "spread")).cfg) is True
    assert record.moment_selectors(make_run(tmp_path, ("cas", "spread")).cfg) == ["spread"]
    assert record.keeps_moments(make_run(tmp_path, moments=True).cfg) is True
    with pytest.raises(EsnError, match=r"record.moments = false, but selector\(s\) spread .* need the gate moments"):
        record.keeps_moments(make_run(tmp_path, ("cas", "spread"), moments=False).cfg)


def test_the_storage_choices_leave_the_run_directory_fingerprints_alone(tmp_path):
    """Older run directories (made before these options, i.e. moments on and raw shards) still open."""
    base = make_run(tmp_path).stage_config()
    assert make_run(tmp_path, moments=True, compress=False).stage_config() == base


def test_selections_are_identical_on_every_encoding(tmp_path):
    """The same attempts stored raw with moments (as every esn before) and compressed without: every mask
    file the select stage writes is byte for byte the same."""
    masks = []
    for name, moments, compress in (("old", True, False), ("new", False, True)):
        (tmp_path / name).mkdir()
        run = make_run(tmp_path / name, ("cas", "lap", "lape", "mad", "random"))
        with run:
            fill(run, moments=moments, compress=compress)
            select.select(run)
            masks.append({p.name: p.read_bytes() for p in sorted(run.rundir.select.glob("masks_*"))})
    assert len(masks[0]) == 10 and masks[0] == masks[1]  # five selectors, two streams


def test_select_with_a_moment_selector_on_a_store_without_moments_says_how_to_record_again(tmp_path, with_spread):
    run = make_run(tmp_path, ("spread", "cas"))
    with run:
        fill(run, moments=False, compress=True)
        with pytest.raises(EsnError, match=r"selector 'spread' needs the gate moments .* recorded without them .*"
                                           r"record.moments = true, into a new run_dir"):
            select.select(run)
        assert not (run.rundir.select / "summary.json").exists()
        # and recording into it again is refused up front: the store would mix attempts with and without
        with pytest.raises(EsnError, match="holds attempts recorded without gate moments"):
            record.check_moments(run, record.keeps_moments(run.cfg))


def test_a_moment_selector_gets_the_moments_of_its_stream(tmp_path, with_spread):
    run = make_run(tmp_path, ("spread", "cas"))
    with run:
        store = fill(run, moments=True, compress=True)
        assert store.has_moments() is True
        select.select(run)
        result = select.success_sets(run, 3, "ser")
        stats = aggregate(store, result.success).select_streams(["lm"])
        want = select_neurons(stats.probs(), "spread", 0.25, emotions=stats.emotions, moments=stats.moments(),
                              registry=plugins.registry())
        got = select.masks(run, "spread_r0.25_c3")
        assert got.meta["selector_options"] == {}
        for e in TARGETS:
            np.testing.assert_array_equal(got.masks[e].indices, want[e])
        s, t = stats.S, stats.positions()
        np.testing.assert_allclose(stats.moments().var, np.maximum(stats.SS / t - (s / t) ** 2, 0))
    with pytest.raises(EsnError, match="selector 'spread' needs the gate moments"):
        select_neurons(stats.probs(), "spread", 0.25, emotions=stats.emotions, registry=plugins.registry())


def test_record_prints_the_size_and_refuses_a_small_disk_before_loading_the_model(tmp_path, monkeypatch):
    run = make_run(tmp_path, compress=False)
    with run:
        first = [a.id for a in record.attempts(run)][:4]  # the first batch is stored: a resumed run
        fill(run, moments=False, compress=False, ids=first)
        before = sorted(p.name for p in (run.rundir.record / "shards").iterdir())
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=500))
        with pytest.raises(EsnError, match=r"needs up to .* for 8 attempts .* has 500 B free.*record.compress = true"):
            record.record(run)  # the checkpoint does not exist: the check came before loading it
        out = run.console.file.getvalue()
        per = attempt_bytes(LAYOUT, moments=False) + record.SIDECAR_BYTES
        assert f"up to {record._size(per)} an attempt" in out and "moments off (no configured selector needs them" in out
        assert "the study's 12 attempts" in out and "the 8 still to record" in out
        assert sorted(p.name for p in (run.rundir.record / "shards").iterdir()) == before
        monkeypatch.undo()
        with pytest.raises(EsnError, match="no-such-checkpoint"):  # enough space: on to loading the model
            record.record(run)


def test_a_store_written_by_an_older_esn_still_loads_resumes_and_selects_the_same(tmp_path):
    """core/tests/data/store_v1: raw shards with moments, written by esn before compressed shards existed
    (make_store_v1.py). It opens, counts as recorded (a rerun loads no model), selects, and its attempts
    copied into a compressed store select the same masks, byte for byte."""
    fixture = Path(__file__).parent / "data" / "store_v1"
    masks = []
    for name in ("old", "copied"):
        (tmp_path / name).mkdir()
        run = make_run(tmp_path / name)
        with run:
            if name == "old":
                shutil.copytree(fixture, run.rundir.record)
                store = record.store(run)
                assert store.has_moments() is True and len(store.records()) == 12
                assert store.done_ids() == {a.id for a in record.attempts(run)}
                # prompts.json as this esn seals it (an unsealed or missing one is written again, which loads
                # the model: tests/test_resume.py); then nothing is left to do and the checkpoint is never loaded
                atomic_write_json(run.rundir.record / "prompts.json", seal(
                    {"adapter": "qwen_omni", "system_prompt": None, "instruction": None, "instruction_channel": True,
                     "speaks_given_words": False, "text_out": True}))
                record.record(run)
                assert "all 12 attempts already recorded" in run.console.file.getvalue()
            else:
                AttemptStore(run.rundir.record, LAYOUT, architecture="tiny").merge_from(
                    AttemptStore(fixture), worker="b000000", compress=True)
                assert record.store(run).has_moments() is True
            select.select(run)
            masks.append({p.name: p.read_bytes() for p in sorted(run.rundir.select.glob("masks_*"))})
    assert len(masks[0]) == 4 and masks[0] == masks[1]
    assert {p.name for p in fixture.rglob("*")} >= {"layout.json", "b000002-000000.safetensors"}  # untouched
