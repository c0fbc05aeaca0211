"""The staged, resumable runner: record -> select -> evaluate -> report, into one run directory.

Run directory::

    manifest.json            config, versions, seeds, git hashes, per-stage config fingerprints
    record/                  per-attempt records + gate counts (AttemptStore), record/audio/*.wav
    select/                  activation statistics and masks (one file per mask recipe), analysis.json
    evaluate/batches/*.json  one file per batch of the grid; evaluate/audio/*.wav; evaluate/results.json
    report.md, report.html, figures/*.png

Resuming: the unit of work is a batch cut from a fixed, ordered attempt list (``batch_size`` apart), so
the rows that share a batch — and the per-batch seed derived from (run seed, first attempt id) — are the
same whether or not the run was interrupted. A batch's results are written atomically as one unit, so
a killed run leaves whole batches or nothing; rerunning skips finished batches and recomputes the rest,
and the final artifacts are byte-identical to an uninterrupted run. A lock file keeps two processes out.

Several processes: record and evaluate take a shard ``(K, N)`` and then do only the batches ``k`` with
``k % N == K``. A batch's files are named after ``k`` alone, so N shards together write exactly the files
one process writes. Locks: an unsharded process holds ``.lock`` exclusively; a shard holds it shared, plus
``.lock-shard-K-of-N`` exclusively (the same shard twice is refused), and shards of different N or config
never mix. Opening takes turns through ``.lock-open``; only a process alone in the directory removes
temporary files and rewrites the manifest, so a live shard's half-written files are never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import platform
import re
import subprocess
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from esn.errors import EsnError
from esn.pipeline.config import RunConfig, Setting, mask_recipes, settings
from esn.pipeline.data import CSVDataset, ESDDataset, Source
from esn.pipeline.evaluate import BASELINE, EvalAttempt, derive_seed, grid, summarize
from esn.pipeline.files import atomic_write_json, atomic_write_wav, clean_temp, dumps, read_json
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

STAGES = ("record", "select", "evaluate", "report")
SHARDED_STAGES = ("record", "evaluate")  # lists of independent batches; select and report run once
JUDGE_RATE = 16_000  # the paper resamples every generation to 16 kHz before judging


@dataclass(frozen=True)
class RecordAttempt:
    source: Source
    target: str

    @property
    def id(self) -> str:
        return f"{self.source.id}|{self.target}"


def chunks(items: Sequence, size: int) -> Iterator[tuple[int, Sequence]]:
    for k, start in enumerate(range(0, len(items), size)):
        yield k, items[start : start + size]


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


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    """Hold a blocking flock on ``path`` for the block."""
    with open(path, "w") as fh:
        fcntl.flock(fh, mode)
        yield


def _try_lock(fh, mode: int) -> bool:
    try:
        fcntl.flock(fh, mode | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(dumps(obj).encode()).hexdigest()[:16]


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
    )


class Run:
    """One run directory and the config that made it. Stages are methods; each one is resumable."""

    def __init__(self, cfg: RunConfig, *, console: Console | None = None, shard: tuple[int, int] | None = None):
        self.cfg = cfg
        self.dir: Path = Path(cfg.run_dir)
        self.console = console or Console(quiet=True)
        if shard is not None:
            parse_shard(f"{shard[0]}/{shard[1]}")
        self.shard = shard  # (K, N): record and evaluate do the batches k with k % N == K; None: all
        self._lock = None
        self._shard_lock = None

    def _mine(self, k: int) -> bool:
        return self.shard is None or k % self.shard[1] == self.shard[0]

    @property
    def _tag(self) -> str:
        return "" if self.shard is None else f" {self.shard[0]}/{self.shard[1]}"

    # -- bookkeeping ---------------------------------------------------------------------------------
    def stage_config(self) -> dict[str, Any]:
        """The config parts each stage's results depend on (a change invalidates that stage)."""
        c = self.cfg.model_dump(mode="json")
        record = {k: c[k] for k in ("seed", "model", "data", "generation", "judges", "record")}
        select = {"record": record, **{k: c[k] for k in ("filter", "anchor", "sweep")}}
        evaluate = {"select": select, "evaluate": c["evaluate"]}
        return {"record": record, "select": select, "evaluate": evaluate}

    def open(self) -> Run:
        """Create or reopen the run directory; refuse one made by a different config.

        Unsharded: the directory to itself. A shard: beside other shards of the same N and config only.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        fingerprints = {k: _fingerprint(v) for k, v in self.stage_config().items()}
        # Opens take turns (a few milliseconds each), so lock checks, clean-up and manifest are one step.
        with _flock(self.dir / ".lock-open", fcntl.LOCK_EX):
            try:
                if self._take_locks():
                    self._prepare(fingerprints)
                    if self.shard is not None:  # let further shards in
                        fcntl.flock(self._lock, fcntl.LOCK_SH)
                else:
                    self._join(fingerprints)
            except BaseException:
                self.close()
                raise
        return self

    def _take_locks(self) -> bool:
        """Take this process's locks; True when no other process is in the run directory."""
        self._lock = open(self.dir / ".lock", "w")
        if self.shard is None:
            if not _try_lock(self._lock, fcntl.LOCK_EX):
                raise EsnError(f"another esn process is using run directory {self.dir}")
            return True
        alone = _try_lock(self._lock, fcntl.LOCK_EX)
        if not alone and not _try_lock(self._lock, fcntl.LOCK_SH):
            raise EsnError(f"an esn process without --shard is using run directory {self.dir}; shards run only "
                           "beside other shards")
        k, n = self.shard
        self._shard_lock = open(self.dir / f".lock-shard-{k}-of-{n}", "w")
        if not _try_lock(self._shard_lock, fcntl.LOCK_EX):
            raise EsnError(f"shard {k}/{n} is already running on run directory {self.dir}")
        return alone

    def _join(self, fingerprints: dict[str, str]) -> None:
        """Shards already run here: this one must split the same batches (same N) of the same config."""
        k, n = self.shard
        for path in self.dir.glob(".lock-shard-*-of-*"):
            other = re.fullmatch(r"\.lock-shard-(\d+)-of-(\d+)", path.name)
            if other is None or int(other[2]) == n:
                continue
            with open(path, "w") as fh:
                if not _try_lock(fh, fcntl.LOCK_EX):
                    raise EsnError(f"shard {other[1]}/{other[2]} is running on run directory {self.dir}: every "
                                   f"shard running at once must use the same N (got --shard {k}/{n})")
        path = self.dir / "manifest.json"
        old = read_json(path).get("fingerprints") if path.exists() else None
        if old != fingerprints:
            changed = ", ".join(self._changed("", path)) if path.exists() else "?"
            raise EsnError(f"shards with another configuration are running on run directory {self.dir} (the parts "
                           f"that differ: {changed}); every shard of a run takes the same config")

    def _prepare(self, fingerprints: dict[str, str]) -> None:
        """Alone in the directory: remove a killed run's temp files, check and write the manifest."""
        clean_temp(self.dir)
        path = self.dir / "manifest.json"
        if path.exists():
            old = read_json(path).get("fingerprints", {})
            for stage in ("record", "select", "evaluate"):
                if old.get(stage) not in (None, fingerprints[stage]) and self._has_results(stage):
                    raise EsnError(
                        f"run directory {self.dir} holds {stage} results made with a different configuration "
                        f"(the parts that changed: {', '.join(self._changed(stage, path))}). Use a new run_dir, "
                        f"or delete {self.dir / stage} to recompute that stage and the ones after it."
                    )
        atomic_write_json(path, self.manifest(fingerprints))
        return self

    def _has_results(self, stage: str) -> bool:
        folder = self.dir / stage
        return folder.is_dir() and any(folder.iterdir())

    def _changed(self, stage: str, path: Path) -> list[str]:
        old = read_json(path).get("config", {})
        new = self.cfg.model_dump(mode="json")
        return [k for k in new if old.get(k) != new.get(k)] or ["?"]

    def manifest(self, fingerprints: dict[str, str]) -> dict:
        from esn import __version__

        versions = {"esn-core": __version__, "python": platform.python_version()}
        for dist in ("torch", "transformers", "numpy", "nnsight", "funasr"):
            with contextlib.suppress(Exception):
                from importlib.metadata import version

                versions[dist] = version(dist)
        return {
            "config": self.cfg.model_dump(mode="json"),
            "fingerprints": fingerprints,
            "seeds": {"run": self.cfg.seed, "batch": "derive_seed(run seed, stage, first attempt id of the batch)"},
            "versions": versions,
            "git": _git_hash(Path(__file__).resolve().parent),
        }

    def close(self) -> None:
        for name in ("_shard_lock", "_lock"):
            if getattr(self, name) is not None:
                getattr(self, name).close()
                setattr(self, name, None)

    def __enter__(self) -> Run:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- shared resources ----------------------------------------------------------------------------
    @cached_property
    def dataset(self) -> ESDDataset | CSVDataset:
        d = self.cfg.data
        if d.kind == "csv":
            return CSVDataset(d.root)
        return ESDDataset(d.root, d.splits)

    def sources(self, split: str) -> list[Source]:
        found = self.dataset.sources(split)
        cap = self.cfg.data.max_sources
        if cap is not None and len(found) > cap:
            rng = np.random.default_rng(derive_seed(self.cfg.seed, "sources", split))
            keep = np.sort(rng.choice(len(found), size=cap, replace=False))
            found = [found[i] for i in keep]
        return found

    @cached_property
    def adapter(self):
        from esn.plugins import registry

        m = self.cfg.model
        cls = registry().adapter(m.adapter)
        self.console.print(f"loading [bold]{m.adapter}[/] from {m.source}")
        return cls.load(m.source, dtype=m.dtype, device=m.device, trust_remote_code=m.trust_remote_code)

    @cached_property
    def emotion_judges(self) -> dict[str, Any]:
        return {spec.name: self._load_judge(spec) for spec in self.cfg.judges.emotion}

    @cached_property
    def quality_judge(self):
        spec = self.cfg.judges.quality
        return None if spec is None else self._load_judge(spec)

    def _load_judge(self, spec):
        from esn.plugins import registry

        cls = registry().judge(spec.name)
        return cls.load(spec.source, device=self.cfg.model.device, **spec.options)

    # -- shared step: convert, judge, score ---------------------------------------------------------
    def _requests(self, rows: Sequence[tuple[str, Source, str]]):
        from esn.adapters import EVCRequest
        from esn.audio import prepare_audio

        return [EVCRequest(audio=prepare_audio(src.path, name=str(src.path)), emotion=target, id=aid,
                           transcript=src.transcript) for aid, src, target in rows]

    def _judge(self, results, requests) -> tuple[list[dict[str, str | None]], list[float | None]]:
        """Emotion labels per judge and a quality score, for each result (None where nothing can be judged)."""
        from esn.judges import Audio

        j = self.cfg.judges
        prepared = [judge_input(r.waveform, r.sample_rate, loudness_dbfs=j.loudness_dbfs, min_seconds=j.min_seconds)
                    for r in results]
        keep = [i for i, w in enumerate(prepared) if w is not None]
        audios = [Audio(prepared[i], JUDGE_RATE, results[i].id) for i in keep]
        srcs = [Audio(requests[i].audio, JUDGE_RATE, requests[i].id) for i in keep]
        labels: list[dict[str, str | None]] = [{name: None for name in self.emotion_judges} for _ in results]
        quality: list[float | None] = [None] * len(results)
        if not keep:
            return labels, quality
        for name, judge in self.emotion_judges.items():
            for i, v in zip(keep, judge.judge(audios, sources=srcs), strict=True):
                labels[i][name] = v.label
        if self.quality_judge is not None:
            for i, v in zip(keep, self.quality_judge.judge(audios, sources=srcs), strict=True):
                mos = v.scores.get("mos")
                quality[i] = None if mos is None else round(float(mos), 6)
        return labels, quality

    def _generation(self, stage: str, first_id: str):
        return self.cfg.generation.model_copy(update={"seed": derive_seed(self.cfg.seed, stage, first_id)})

    # -- stage 1: record ------------------------------------------------------------------------------
    def record_attempts(self) -> list[RecordAttempt]:
        srcs = self.sources(self.cfg.record.split)
        return [RecordAttempt(s, t) for s in srcs for t in self.cfg.record.targets]

    @property
    def store_dir(self) -> Path:
        return self.dir / "record"

    def store(self, layout=None):
        """The attempt store of this run (created with the adapter's layout on first use)."""
        from esn.store import AttemptStore

        if layout is None and not (self.store_dir / "layout.json").exists():
            raise EsnError(f"no recorded attempts in {self.store_dir}: run `esn record` first")
        return AttemptStore(self.store_dir, layout, architecture=None if layout is None else self.adapter.architecture)

    def _owns(self, stem: str) -> bool:
        """Whether this process writes the store shard ``stem`` ("b<batch>-<seq>")."""
        if self.shard is None:
            return True
        m = re.fullmatch(r"b(\d+)-\d+", stem)
        return m is not None and self._mine(int(m[1]))

    def record(self) -> None:
        from esn.store import StoreWarning

        with warnings.catch_warnings():
            if self.shard is not None:  # another shard's write in flight looks like an interrupted one
                warnings.simplefilter("ignore", StoreWarning)
            self._record()

    def _record(self) -> None:
        from esn.recording import GateRecorder
        from esn.wer import wer

        attempts = self.record_attempts()
        batches = [(k, b) for k, b in chunks(attempts, self.cfg.record.batch_size) if self._mine(k)]
        opened = (self.store_dir / "layout.json").exists()
        done = self.store().done_ids() if opened else set()
        todo = [(k, b) for k, b in batches if not all(a.id in done for a in b)]
        if not todo:
            n = sum(len(b) for _, b in batches)
            self.console.print(f"record{self._tag}: all {n} attempts{' of this shard' if self.shard else ''} "
                               "already recorded")
            return
        adapter = self.adapter
        streams = self.cfg.model.streams
        store = self.store(adapter.layout(streams))
        # A killed write can leave a tensor file without its sidecar: drop it so shard names stay
        # "b<batch>-000000" and a resumed run writes exactly the files of an uninterrupted one. A shard
        # drops only its own batches' (another shard may be between its two renames).
        for orphan in store.shard_dir.glob("*.safetensors"):
            if not orphan.with_suffix(".json").exists() and self._owns(orphan.stem):
                orphan.unlink()
        with _progress(self.console) as bar:
            task = bar.add_task(f"record{self._tag}", total=len(batches), completed=len(batches) - len(todo))
            for k, batch in todo:
                requests = self._requests([(a.id, a.source, a.target) for a in batch])
                gen = self._generation("record", batch[0].id)
                if adapter.batched:
                    with GateRecorder(adapter, streams=streams) as rec:
                        results = adapter.generate(requests, gen)
                    stats = [rec.stats()]
                else:  # one request at a time, each with its own recorder
                    results, stats = [], []
                    for req in requests:
                        with GateRecorder(adapter, streams=streams) as rec:
                            results += adapter.generate([req], gen)
                        stats.append(rec.stats())
                from esn.recording import BatchStats

                st = BatchStats.concat(stats)
                labels, _ = self._judge(results, requests)
                records = []
                for a, res, lab in zip(batch, results, labels, strict=True):
                    audio = None
                    if self.cfg.record.save_audio and res.waveform.size:
                        audio = f"audio/{_safe(a.id)}.wav"
                        atomic_write_wav(self.store_dir / audio, res.waveform, res.sample_rate)
                    meta = {"source": a.source.id, "speaker": a.source.speaker, "index": a.source.index,
                            "wer": round(wer(a.source.transcript, res.text), 6), "labels": lab,
                            "label": lab[self.filter_judge], "audio": audio}
                    records.append({"id": a.id, "emotion": a.target, "transcript": a.source.transcript,
                                    "text": res.text, "meta": meta})
                keep = [i for i, a in enumerate(batch) if a.id not in done]
                sums = None if st.sums is None else st.sums.numpy()[keep]
                sumsq = None if st.sumsq is None else st.sumsq.numpy()[keep]
                store.append([records[i] for i in keep], st.counts.numpy()[keep], st.tokens.numpy()[keep],
                             sums, sumsq, worker=f"b{k:06d}")
                bar.advance(task)

    @property
    def filter_judge(self) -> str:
        return self.cfg.judges.emotion[0].name

    # -- stage 2: select ------------------------------------------------------------------------------
    @property
    def select_dir(self) -> Path:
        return self.dir / "select"

    def success_sets(self, c: int, labels: str):
        """The filtered, capped success sets (``FilterResult``); an empty emotion is a clear error."""
        from esn.filtering import filter_attempts, load_label_csv

        records = self.store().records()
        f = self.cfg.filter
        targets = self.cfg.record.targets
        if labels == "human":
            judged = load_label_csv(f.human_labels)
            who = f"human labels in {f.human_labels}"
        else:
            judged = {r.id: r.meta.get("label") for r in records}
            who = f"judge {self.filter_judge!r}"
        result = filter_attempts(records, judged, tau_wer=f.tau_wer, cap=c, seed=self.cfg.seed, emotions=targets,
                                 require_match=f.require_match)
        empty = [e for e in targets if not result.success.get(e)]
        if empty:
            raise EsnError(
                f"no successful conversion for {', '.join(empty)} among {len(records)} recorded attempts "
                f"({who} must give the target emotion{'' if f.require_match else ' (not required here)'} and "
                f"WER <= tau_wer={f.tau_wer:g}). Every record is kept in {self.store_dir}; record more sources, "
                f"or relax [filter], then run `esn select` again."
            )
        return result

    def select(self) -> None:
        """Filter, aggregate and select: one statistics file per (c, labels), one mask set per recipe."""
        from esn import artifacts
        from esn.selection import select_neurons
        from esn.statistics import aggregate

        targets = self.cfg.record.targets
        out = self.select_dir
        stats_cache: dict[tuple[int, str], Any] = {}
        summary: dict[str, Any] = {"success_sets": {}, "masks": {}}
        for selector, rate, c, labels in mask_recipes(self.cfg):
            key = Setting(selector, rate, c, labels, "", 0.0).mask_key
            if (c, labels) not in stats_cache:
                result = self.success_sets(c, labels)
                name = f"c{c}_{labels}"
                summary["success_sets"][name] = result.success
                _write_verdicts(result, out / f"verdicts_{name}.csv")
                stats = aggregate(self.store(), result.success)
                stats.meta = {"source_run": "record", "c": c, "labels": labels, "seed": self.cfg.seed,
                              "tau_wer": self.cfg.filter.tau_wer}
                stats_path = out / f"stats_{name}.safetensors"
                if not stats_path.exists():
                    artifacts.save_stats(stats_path, stats)
                stats_cache[(c, labels)] = stats
            stats = stats_cache[(c, labels)]
            path = out / f"masks_{key}.safetensors"
            if not path.exists():
                chosen = select_neurons(stats.probs(), selector, rate, emotions=stats.emotions, seed=self.cfg.seed)
                artifacts.save_masks(path, {e: chosen[e] for e in targets}, layout=stats.layout, meta={
                    "architecture": self.store().architecture, "selector": selector, "r": rate, "c": c,
                    "tau_wer": self.cfg.filter.tau_wer, "judge": "human" if labels == "human" else self.filter_judge,
                    "seed": self.cfg.seed, "source_run": "record"})
            summary["masks"][key] = {e: len(m) for e, m in self.masks(key).masks.items()}
        if self.cfg.filter.human_labels is not None:
            self._human_similarity()
        atomic_write_json(out / "summary.json", summary)

    def _human_similarity(self) -> None:
        """Table 5: anchor masks from human- vs judge-filtered successes, per emotion."""
        from esn import analysis

        a = settings(self.cfg)[0]
        ser = self.masks(Setting(a.selector, a.rate, a.c, "ser", "", 0.0).mask_key)
        hum = self.masks(Setting(a.selector, a.rate, a.c, "human", "", 0.0).mask_key)
        table = analysis.compare(ser.masks, hum.masks, ser.layout)
        atomic_write_json(self.select_dir / "human_similarity.json", {e: vars(v) for e, v in table.items()})

    def masks(self, mask_key: str):
        """The ``MaskSet`` of one recipe, as saved by the select stage."""
        from esn import artifacts

        path = self.select_dir / f"masks_{mask_key}.safetensors"
        if not path.exists():
            raise EsnError(f"mask file not found: {path}; run `esn select` first")
        return artifacts.load_masks(path)

    # -- stage 3: evaluate ----------------------------------------------------------------------------
    @property
    def eval_dir(self) -> Path:
        return self.dir / "evaluate"

    def eval_attempts(self) -> list[EvalAttempt]:
        sts = settings(self.cfg)
        out: list[EvalAttempt] = []
        for split in self.cfg.evaluate.splits:
            out += grid(split, [s.id for s in self.sources(split)], self.cfg.record.targets, sts)
        return out

    def evaluate(self) -> bool:
        """Run this process's batches of the grid; summarise into results.json once the whole grid is done.

        Returns whether results.json was written (a shard that finishes before the others does not)."""
        from esn import artifacts
        from esn.wer import corpus_wer, wer

        attempts = self.eval_attempts()
        by_id = {s.id: s for split in self.cfg.evaluate.splits for s in self.sources(split)}
        sts = {st.key: st for st in settings(self.cfg)}
        batches = list(chunks(attempts, self.cfg.evaluate.batch_size))
        bdir = self.eval_dir / "batches"

        def done(k: int, batch) -> bool:
            path = bdir / f"{k:06d}.json"
            return path.exists() and [r["id"] for r in read_json(path)] == [a.id for a in batch]

        mine = [(k, b) for k, b in batches if self._mine(k)]
        todo = [(k, b) for k, b in mine if not done(k, b)]
        if todo:
            layout = self.adapter.layout(self.cfg.model.streams)
            mask_cache = {key: artifacts.load_masks(self.select_dir / f"masks_{st.mask_key}.safetensors", layout).masks
                          for key, st in sts.items()}
            with _progress(self.console) as bar:
                task = bar.add_task(f"evaluate{self._tag}", total=len(mine), completed=len(mine) - len(todo))
                for k, batch in todo:
                    rows = [(a.id, by_id[a.source], a.target) for a in batch]
                    requests = self._requests(rows)
                    conds = [None if a.setting == BASELINE else (mask_cache[a.setting][a.mask], sts[a.setting])
                             for a in batch]
                    results = self._steered_generate(requests, conds, self._generation("evaluate", batch[0].id))
                    labels, quality = self._judge(results, requests)
                    records = []
                    for a, res, lab, q in zip(batch, results, labels, quality, strict=True):
                        audio = None
                        if self.cfg.evaluate.save_audio and res.waveform.size:
                            audio = f"audio/{_safe(a.id)}.wav"
                            atomic_write_wav(self.eval_dir / audio, res.waveform, res.sample_rate)
                        ref = by_id[a.source].transcript
                        records.append({"id": a.id, "split": a.split, "setting": a.setting, "mask": a.mask,
                                        "source": a.source, "target": a.target, "reference": ref, "text": res.text,
                                        "wer": round(wer(ref, res.text), 6), "labels": lab, "quality": q,
                                        "audio": audio})
                    atomic_write_json(bdir / f"{k:06d}.json", records)
                    bar.advance(task)
        if self.shard is not None:
            # Checked after this shard's last write: of shards finishing together, the last sees every batch.
            # Two that both see it write the same bytes (a seeded summary), each atomically.
            missing = sum(not done(k, b) for k, b in batches)
            if missing:
                self.console.print(
                    f"evaluate{self._tag}: this shard's {len(mine)} batches are done; {missing} of {len(batches)} "
                    "batches of the grid are still missing. results.json will be written by the last shard to "
                    "finish, or by `esn evaluate` without --shard.")
                return False
        records = self.eval_records(attempts)
        results = summarize(
            records, list(sts), self.cfg.record.targets, [j.name for j in self.cfg.judges.emotion],
            self.cfg.evaluate.splits, n_boot=self.cfg.evaluate.bootstrap, seed=self.cfg.seed,
            wer_fn=lambda refs, hyps: corpus_wer(refs, hyps).wer,
        )
        meta = {"settings": {k: vars(st) for k, st in sts.items()}, "targets": self.cfg.record.targets,
                "judges": [j.name for j in self.cfg.judges.emotion], "splits": self.cfg.evaluate.splits,
                "bootstrap": self.cfg.evaluate.bootstrap}
        atomic_write_json(self.eval_dir / "results.json", {"meta": meta, "groups": results})
        if self.shard is not None:
            self.console.print(f"evaluate{self._tag}: the grid is complete; wrote {self.eval_dir / 'results.json'}")
        return True

    def eval_records(self, attempts: list[EvalAttempt] | None = None) -> list[dict]:
        attempts = attempts if attempts is not None else self.eval_attempts()
        out: list[dict] = []
        for k, batch in chunks(attempts, self.cfg.evaluate.batch_size):
            path = self.eval_dir / "batches" / f"{k:06d}.json"
            if not path.exists():
                raise EsnError(f"evaluation batch {path} is missing: run `esn evaluate` to finish the grid")
            rows = read_json(path)
            if [r["id"] for r in rows] != [a.id for a in batch]:
                raise EsnError(f"evaluation batch {path} belongs to another grid: run `esn evaluate` to redo it")
            out += rows
        return out

    def _steered_generate(self, requests, conds, gen):
        """Generate with a per-row condition (None = no intervention): one batch if the adapter is batched."""
        from esn.steering import Condition, steer, steer_rows

        adapter = self.adapter
        if adapter.batched:
            rows = [None if c is None else Condition(c[0], c[1].method, c[1].alpha) for c in conds]
            with steer_rows(adapter, rows):
                return adapter.generate(requests, gen)
        out = []
        for req, c in zip(requests, conds, strict=True):
            if c is None:
                out += adapter.generate([req], gen)
            else:
                with steer(adapter, c[0], c[1].method, c[1].alpha):
                    out += adapter.generate([req], gen)
        return out

    # -- stage 4: report ------------------------------------------------------------------------------
    def report(self) -> Path:
        from esn.pipeline.report import write_report

        return write_report(self)

    # -- everything -----------------------------------------------------------------------------------
    def run(self, stages: Sequence[str] = STAGES) -> None:
        once = [s for s in stages if s not in SHARDED_STAGES]
        if self.shard is not None and once:
            raise EsnError(f"{', '.join(once)} cannot run as a shard: only {' and '.join(SHARDED_STAGES)} split "
                           "their batches across processes; run the others once, without --shard")
        for stage in stages:
            getattr(self, stage)()


def judge_input(wave: np.ndarray, rate: int, *, loudness_dbfs: float | None = None,
                min_seconds: float = 0.0) -> np.ndarray | None:
    """A clip as judges get it: 16 kHz mono float32, optionally RMS-normalised and zero-padded.

    Returns None for a clip no judge can score (empty, non-finite, or silent: peak below 1e-6 after
    normalisation); such an attempt gets no label, which counts as a miss, never as a guess.
    """
    from esn.audio import resample

    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if wave.size == 0 or not np.all(np.isfinite(wave)):
        return None
    wave = resample(wave, rate, JUDGE_RATE)
    if loudness_dbfs is not None:
        from esn.pipeline.human import rms_normalize

        wave = rms_normalize(wave, loudness_dbfs)
    if float(np.max(np.abs(wave), initial=0.0)) < 1e-6:
        return None
    short = round(min_seconds * JUDGE_RATE) - wave.size
    return np.pad(wave, (0, short)) if short > 0 else wave


def _write_verdicts(result, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    result.write_csv(tmp)
    tmp.replace(path)


def _safe(attempt_id: str) -> str:
    return attempt_id.replace("|", "__").replace("/", "_")


def _git_hash(where: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def load_run(config: str | Path, *, run_dir: str | Path | None = None, console: Console | None = None,
             shard: tuple[int, int] | None = None) -> Run:
    from esn.pipeline.config import load_config

    return Run(load_config(config, run_dir=run_dir), console=console, shard=shard)


def summary_json(run: Run) -> str:
    return json.dumps(read_json(run.eval_dir / "results.json")["meta"], indent=1)
