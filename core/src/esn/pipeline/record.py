"""Stage 1, record: convert every identification source to every target emotion, record gate statistics
per attempt, judge the output and score its decoded text (WER). Results go to ``record/`` (AttemptStore).

Every attempt's counts are stored for all positions together with their prompt (prefill) share, so select
can count P over all positions or over the generated ones only (``record.positions``) without generating
again. ``record/prompts.json`` keeps the system prompt and instruction the adapter actually sent."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from esn.errors import EsnError
from esn.pipeline import convert
from esn.pipeline.batches import chunks
from esn.pipeline.data import Source
from esn.pipeline.files import atomic_write_json, read_json
from esn.pipeline.parallel import progress_bar
from esn.pipeline.run import Run


@dataclass(frozen=True)
class RecordAttempt:
    """One identification attempt: a neutral source to convert to ``target``."""
    source: Source
    target: str

    @property
    def id(self) -> str:
        """``<source id>|<target>``: the attempt's key in the store."""
        return f"{self.source.id}|{self.target}"


def prompts(run: Run) -> dict | None:
    """The prompts the record stage sent (``record/prompts.json``), or None before it ran."""
    path = run.rundir.record / "prompts.json"
    return read_json(path) if path.exists() else None


def attempts(run: Run) -> list[RecordAttempt]:
    """Every source of the record split to every target, in a fixed order (batches are cut from it)."""
    srcs = run.sources(run.cfg.record.split)
    return [RecordAttempt(s, t) for s in srcs for t in run.cfg.record.targets]


def store(run: Run, layout=None):
    """The attempt store of ``run`` (created with the adapter's layout on first use)."""
    from esn.store import AttemptStore

    folder = run.rundir.record
    if layout is None and not (folder / "layout.json").exists():
        raise EsnError(f"no recorded attempts in {folder}: run `esn record` first")
    return AttemptStore(folder, layout, architecture=None if layout is None else run.adapter.architecture)


def record(run: Run) -> None:
    """Record this process's batches that are not recorded yet."""
    from esn.store import StoreWarning

    with warnings.catch_warnings():
        if run.shard is not None:  # another shard's write in flight looks like an interrupted one
            warnings.simplefilter("ignore", StoreWarning)
        _record(run)


def _owns(run: Run, stem: str) -> bool:
    """Whether this process writes the store shard ``stem`` ("b<batch>-<seq>")."""
    m = re.fullmatch(r"b(\d+)-\d+", stem)  # only files named like the ones this stage writes
    return m is not None and run.mine(int(m[1]))


def _record(run: Run) -> None:
    from esn.recording import BatchStats, GateRecorder
    from esn.wer import wer

    cfg = run.cfg
    batches = [(k, b) for k, b in chunks(attempts(run), cfg.record.batch_size) if run.mine(k)]
    opened = (run.rundir.record / "layout.json").exists()
    done = store(run).done_ids() if opened else set()
    todo = [(k, b) for k, b in batches if not all(a.id in done for a in b)]
    if not todo:
        n = sum(len(b) for _, b in batches)
        run.console.print(f"record{run.tag}: all {n} attempts{' of this shard' if run.shard else ''} "
                          "already recorded")
        return
    adapter = run.adapter
    streams = cfg.model.streams
    st_store = store(run, adapter.layout(streams))
    atomic_write_json(run.rundir.record / "prompts.json", {"adapter": cfg.model.adapter,
                                                           **adapter.prompt_texts(cfg.generation)})
    # A killed write can leave a tensor file without its sidecar: drop it so shard names stay
    # "b<batch>-000000" and a resumed run writes exactly the files of an uninterrupted one. A shard
    # drops only its own batches' (another shard may be between its two renames).
    for orphan in st_store.shard_dir.glob("b*-*.safetensors"):
        if not orphan.with_suffix(".json").exists() and _owns(run, orphan.stem):
            orphan.unlink()
    with progress_bar(run.console) as bar:
        task = bar.add_task(f"record{run.tag}", total=len(batches), completed=len(batches) - len(todo))
        for k, batch in todo:
            reqs = convert.requests([(a.id, a.source, a.target) for a in batch])
            gen = convert.generation(run, "record", batch[0].id)
            if adapter.batched:
                with GateRecorder(adapter, streams=streams) as rec:
                    results = adapter.generate(reqs, gen)
                stats = [rec.stats()]
            else:  # one request at a time, each with its own recorder
                results, stats = [], []
                for req in reqs:
                    with GateRecorder(adapter, streams=streams) as rec:
                        results += adapter.generate([req], gen)
                    stats.append(rec.stats())
            st = BatchStats.concat(stats)
            labels, _ = convert.judge(run, results, reqs)
            records = []
            for a, res, lab in zip(batch, results, labels, strict=True):
                audio = convert.save_audio(run.rundir.record, a.id, res) if cfg.record.save_audio else {"audio": None}
                meta = {"source": a.source.id, "speaker": a.source.speaker, "index": a.source.index,
                        "wer": round(wer(a.source.transcript, res.text), 6), "labels": lab,
                        "label": lab[run.filter_judge], **audio}
                records.append({"id": a.id, "emotion": a.target, "transcript": a.source.transcript,
                                "text": res.text, "meta": meta})
            keep = [i for i, a in enumerate(batch) if a.id not in done]
            arrays = {name: a[keep] for name, a in st.numpy().items()}
            st_store.append([records[i] for i in keep], worker=f"b{k:06d}", **arrays)
            bar.advance(task)
