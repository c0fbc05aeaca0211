"""Stage 1, record: convert every identification source to every target emotion, record gate statistics
per attempt, judge the output and score its decoded text (WER). Results go to ``record/`` (AttemptStore).

Every attempt's counts are stored for all positions together with their prompt (prefill) share, so select
can count P over all positions or over the generated ones only (``record.positions``) without generating
again. ``record/prompts.json`` keeps the system prompt and instruction the adapter actually sent."""

from __future__ import annotations

import functools
import os
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from esn.errors import EsnError
from esn.pipeline import convert
from esn.pipeline.batches import chunks
from esn.pipeline.data import Source
from esn.pipeline.files import atomic_write_json, atomic_write_wav, read_sealed, refuse_non_file, seal
from esn.pipeline.run import Run
from esn.pipeline.writer import BackgroundWriter


@dataclass(frozen=True)
class RecordAttempt:
    """One identification attempt: a neutral source to convert to ``target``."""
    source: Source
    target: str

    @property
    def id(self) -> str:
        """``<source id>|<target>``: the attempt's key in the store."""
        return f"{self.source.id}|{self.target}"


PROMPT_KEYS = ("adapter", "system_prompt", "instruction")  # text or null
CONTRACT_KEYS = ("instruction_channel", "speaks_given_words", "text_out")  # the adapter's EVC contract: bools


def prompts(run: Run) -> dict | None:
    """The prompts the record stage sent (``record/prompts.json``), or None before it ran; a damaged,
    edited or wrong-schema file is an EsnError (``esn record`` writes it again)."""
    path = run.rundir.record / "prompts.json"
    if not os.path.lexists(path):
        return None
    fix = "run `esn record` to write it again (nothing is recorded twice)"
    data = read_sealed(path, fix)
    if (set(data) != {*PROMPT_KEYS, *CONTRACT_KEYS} or not all(data[k] is None or isinstance(data[k], str)
                                                              for k in PROMPT_KEYS)
            or not all(isinstance(data[k], bool) for k in CONTRACT_KEYS)):
        raise EsnError(f"{path} is not an esn prompts file (keys {', '.join(PROMPT_KEYS)}, each text or null, "
                       f"and {', '.join(CONTRACT_KEYS)}, each true or false); {fix}")
    return data


def _write_prompts(run: Run) -> None:
    """``record/prompts.json``: what the adapter actually sends (``sent``), sealed against damage and edits."""
    given = sent(run.adapter, run.cfg.generation)
    data = {"adapter": run.cfg.model.adapter, **{k: given.get(k) for k in PROMPT_KEYS[1:] + CONTRACT_KEYS}}
    atomic_write_json(run.rundir.record / "prompts.json", seal(data))


def _prompts_damaged(run: Run) -> bool:
    """Whether a rerun with nothing left to record must still write ``prompts.json`` again (damaged, edited,
    or missing beside recorded attempts); a folder in its place is refused."""
    path = run.rundir.record / "prompts.json"
    refuse_non_file(path, "the record stage's prompts")
    try:
        return prompts(run) is None
    except EsnError as exc:
        warnings.warn(f"{exc} -- writing it again", stacklevel=2)
        return True


def sent(adapter, generation) -> dict:
    """What the model was given beside the speech, for ``prompts.json`` and the report: the adapter's prompt
    texts (none with ``instruction_channel = False``: nothing is sent) and its EVC contract flags."""
    contract = {"instruction_channel": bool(getattr(adapter, "instruction_channel", True)),
                "speaks_given_words": bool(getattr(adapter, "speaks_given_words", False)),
                "text_out": bool(getattr(adapter, "text_out", True))}
    texts = (adapter.prompt_texts(generation) if contract["instruction_channel"]
             else {"system_prompt": None, "instruction": None})
    return {**texts, **contract}


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


def moment_selectors(cfg) -> list[str]:
    """The configured selectors (anchor and sweeps) that take gate moments (``esn.selection.needs_moments``)."""
    from esn.pipeline.config import mask_recipes
    from esn.plugins import registry
    from esn.selection import needs_moments

    names = dict.fromkeys(r.selector for r in mask_recipes(cfg))
    return [n for n in names if needs_moments(registry().selector(n))]


def keeps_moments(cfg) -> bool:
    """Whether record stores sums and sums of squares: ``record.moments``, or with ``"auto"`` only when a
    configured selector needs them. ``false`` beside such a selector is an error before any work."""
    needed = moment_selectors(cfg)
    if cfg.record.moments is False and needed:
        raise EsnError(f"record.moments = false, but selector(s) {', '.join(needed)} of this config need the gate "
                       "moments (sums and sums of squares): set record.moments = true or \"auto\"")
    return bool(needed) if cfg.record.moments == "auto" else cfg.record.moments


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError


SIDECAR_BYTES = 1024  # per attempt, an allowance for its JSON record in the sidecar (typically 300-600 bytes)


def check_space(run: Run, layout, moments: bool, attempts: int, total: int) -> None:
    """Print what an attempt and the study take on disk, and refuse (before generating) a study the free
    space of the record folder cannot hold; ``attempts`` still to record of ``total``."""
    import shutil

    from esn.store import attempt_bytes

    cfg = run.cfg
    per = attempt_bytes(layout, moments=moments) + SIDECAR_BYTES
    need = attempts * per
    free = shutil.disk_usage(run.rundir.record if run.rundir.record.exists() else run.rundir.root).free
    what = ("counts + prompt counts (uint16)" + (" + sums and sums of squares (float32)" if moments else "")
            + f", {layout.n_neurons:,} neurons")
    if moments:
        why = ("record.moments = true" if cfg.record.moments is True
               else f"selector(s) {', '.join(moment_selectors(cfg))} need them")
    else:
        why = f"moments off ({'record.moments = false' if cfg.record.moments is False else 'no configured selector needs them'}, they would add {_size(8 * layout.n_neurons)})"
    packed = ", compressed: counts usually about half that" if cfg.record.compress else ""
    run.console.print(f"record store: up to {_size(per)} an attempt ({what}; {why}{packed}); the study's {total:,} "
                      f"attempts up to {_size(total * per)}, the {attempts:,} still to record up to {_size(need)}, "
                      f"{_size(free)} free", markup=False, highlight=False)
    if need > free:
        raise EsnError(
            f"the record store needs up to {_size(need)} for {attempts:,} attempts ({_size(per)} each) but "
            f"{run.rundir.record} has {_size(free)} free: free space, use a run_dir on a larger disk, or store less "
            + ("(record.moments = false / auto unless a selector needs them: 8 bytes a neuron fewer)"
               if moments else "(record.compress = true keeps the counts in about half)" if not cfg.record.compress
               else "(fewer sources: data.max_sources)"))


def check_moments(run: Run, moments: bool) -> None:
    """Moments needed but attempts already stored without them: an error, before any work (a store never
    mixes: select would have no moments for those attempts)."""
    if moments and (run.rundir.record / "layout.json").exists() and store(run).has_moments() is False:
        raise EsnError(
            f"{run.rundir.record} holds attempts recorded without gate moments (sums and sums of squares), and "
            f"this config needs them ({', '.join(moment_selectors(run.cfg)) or 'record.moments = true'}): record "
            "into a new run_dir (or move record/ away), or drop the selectors that need moments")


def record(run: Run) -> None:
    """Record this process's batches that are not recorded yet."""
    from esn.store import StoreWarning

    with warnings.catch_warnings():
        if run.shard is not None or run.team.world_size > 1:  # another process's write in flight looks
            # like an interrupted one (the writer thread sees these filters too: they are process-wide)
            warnings.simplefilter("ignore", StoreWarning)
        _record(run)


def _owns(run: Run, stem: str) -> bool:
    """Whether this process writes the store shard ``stem`` ("b<batch>-<seq>")."""
    m = re.fullmatch(r"b(\d+)-\d+", stem)  # only files named like the ones this stage writes
    return m is not None and run.team.mine(int(m[1]))


def _plan(run: Run, batches: list[tuple[int, Sequence[RecordAttempt]]]) -> list[tuple[int, list[int]]]:
    """The batches still to record, each with the rows not recorded yet (the leader's view, handed to all).

    A killed write can leave a tensor file without its sidecar: drop it so shard names stay
    "b<batch>-000000" and a resumed run writes exactly the files of an uninterrupted one. A static shard
    drops only its own batches' (another shard may be between its two renames); a group's leader plans
    while the other ranks wait, so it drops them all.
    """
    if (run.rundir.record / "layout.json").exists():
        _drop_damaged(run)
        done = store(run).done_ids()
    else:
        done = set()
    todo = [(k, [i for i, a in enumerate(b) if a.id not in done]) for k, b in batches
            if not all(a.id in done for a in b)]
    if todo:
        for orphan in (run.rundir.record / "shards").glob("b*-*.safetensors"):
            if not orphan.with_suffix(".json").exists() and _owns(run, orphan.stem):
                orphan.unlink()
    run.begin("record", under_way=bool(todo))
    return todo


def _drop_damaged(run: Run) -> None:
    """A shard of this process's batches whose tensors or wavs are not the ones recorded when they were
    written is removed (tensor file and sidecar), so that its batch is recorded again, never trusted."""
    from esn.files import sha256_file

    folder = run.rundir.record

    def wav_ok(rec) -> bool:
        name = rec.meta.get("audio")
        if name is None:
            return True
        wav = folder / name
        refuse_non_file(wav, "a recorded wav")
        return wav.exists() and sha256_file(wav) == rec.meta.get("audio_sha256")

    for stem in store(run).damaged_shards(wav_ok):
        if _owns(run, stem):
            warnings.warn(f"{folder / 'shards' / stem}: its tensors or wavs are damaged (not the ones recorded when "
                          "they were written); that batch is recorded again", stacklevel=2)
            for suffix in (".json", ".safetensors"):  # the sidecar first: a half-removed shard is an orphan
                (folder / "shards" / f"{stem}{suffix}").unlink(missing_ok=True)


def _record(run: Run) -> None:
    from esn.recording import BatchStats, GateRecorder
    from esn.wer import wer

    cfg = run.cfg
    batches = [(k, b) for k, b in chunks(attempts(run), cfg.record.batch_size) if run.team.mine(k)]
    moments = keeps_moments(cfg)  # a bad combination fails before anything else
    todo = run.team.agree(lambda: _plan(run, batches))
    stale_prompts = run.team.is_leader and _prompts_damaged(run)  # warns; written again below either way
    if not todo:
        if stale_prompts:
            _write_prompts(run)
        n = sum(len(b) for _, b in batches)
        run.console.print(f"record{run.team.tag}: all {n} attempts{' of this shard' if run.shard else ''} "
                          "already recorded")
        return
    remaining = sum(len(keep) for _, keep in todo)
    total = sum(len(b) for _, b in batches)
    # the leader's view, so that every rank takes the same collective steps below
    resuming = run.team.agree(lambda: (run.rundir.record / "layout.json").exists())
    if resuming:  # the stored layout tells the size before the model loads

        def check() -> None:
            check_moments(run, moments)
            check_space(run, store(run).layout, moments, remaining, total)

        run.team.on_leader(check)
    adapter = run.adapter
    streams = cfg.model.streams
    st_store = store(run, adapter.layout(streams))
    if not resuming:  # a new store: its layout is the loaded model's, known now, before any generation
        run.team.on_leader(lambda: check_space(run, st_store.layout, moments, remaining, total))
    run.team.on_leader(lambda: _write_prompts(run))
    by_k = dict(batches)
    run.load_judges()  # before the clock starts, and a bad judge fails before any work
    conversions = sum(len(by_k[k]) for k, _ in todo)
    with (run.team.share("record", todo, total=len(batches), conversions=conversions, console=run.console) as claims,
          BackgroundWriter("esn-record-writer") as writer):
        for k, keep in claims:
            t0 = time.perf_counter()
            batch = by_k[k]
            reqs = convert.requests([(a.id, a.source, a.target) for a in batch])
            gen = convert.generation(run, "record", batch[0].id)
            collect = 0.0  # seconds spent bringing the statistics to the host
            if adapter.batched:
                with GateRecorder(adapter, streams=streams, moments=moments) as rec:
                    results = adapter.generate(reqs, gen)
                tc = time.perf_counter()
                stats = [rec.stats()]
                collect += time.perf_counter() - tc
            else:  # one request at a time, each with its own recorder
                results, stats = [], []
                for req in reqs:
                    with GateRecorder(adapter, streams=streams, moments=moments) as rec:
                        results += adapter.generate([req], gen)
                    tc = time.perf_counter()
                    stats.append(rec.stats())
                    collect += time.perf_counter() - tc
            tc = time.perf_counter()
            st = stats[0] if len(stats) == 1 else BatchStats.concat(stats)  # one part: no copy of ~200 MB
            t2 = time.perf_counter()
            collect += t2 - tc
            labels, _ = convert.judge(run, results, reqs)
            records = []
            for a, res, lab in zip(batch, results, labels, strict=True):
                meta = {"source": a.source.id, "speaker": a.source.speaker, "index": a.source.index,
                        "wer": round(wer(a.source.transcript, res.text), 6), "labels": lab,
                        "label": lab[run.filter_judge], **_audio_entry(cfg, a, res)}
                records.append({"id": a.id, "emotion": a.target, "transcript": a.source.transcript,
                                "text": res.text, "meta": meta})
            t3 = time.perf_counter()
            times = {"generate": t2 - t0 - collect, "collect": collect, "judge": t3 - t2}
            write = functools.partial(_write_batch, run, st_store, results, records, st, keep, k)
            then = functools.partial(_written, claims, len(keep), times)
            times["wait"] = writer.submit(write, then)  # the write overlaps the next batch's generate
    run.team.settle([run.rundir.record / "shards" / f"b{k:06d}-000000.json" for k, _ in todo])
    run.team.on_leader(lambda: run.begin("record", under_way=False))


def _audio_entry(cfg, attempt: RecordAttempt, result) -> dict[str, str | None]:
    """The record's audio fields, as ``convert.save_audio`` gives them; the writer fills in the sha256 when it
    writes the wav (``_write_batch``), before the sidecar that holds the record."""
    if not cfg.record.save_audio:
        return {"audio": None}
    name = convert.audio_name(attempt.id) if result.waveform.size else None
    return {"audio": name, "audio_sha256": None}


def _write_batch(run: Run, st_store, results, records: list[dict], st, keep: list[int], k: int) -> None:
    """A batch's wavs, then its store shard ``b<k>-000000`` (sidecar last) of the rows in ``keep``."""
    for res, rec in zip(results, records, strict=True):
        meta = rec["meta"]
        if meta["audio"] is not None:
            meta["audio_sha256"] = atomic_write_wav(run.rundir.record / meta["audio"], res.waveform, res.sample_rate)
    rows = slice(None) if keep == list(range(len(records))) else keep  # every row: a view, not a copy
    arrays = {name: a[rows] for name, a in st.numpy().items()}
    st_store.append([records[i] for i in keep], worker=f"b{k:06d}", compress=run.cfg.record.compress, **arrays)


def _written(claims, conversions: int, times: dict[str, float], seconds: float, finished: float) -> None:
    """The writer finished a batch: it counts as done, with the time its write took."""
    claims.done(conversions, at=finished, **times, store=seconds)
