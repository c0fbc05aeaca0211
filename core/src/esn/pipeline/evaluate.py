"""Stage 3, evaluate: the grid (``esn.pipeline.grid``) of baseline and steered conversions on the test
splits, judged and scored; one file per batch in ``evaluate/batches/`` and, once the whole grid is there,
the metrics in ``evaluate/results.json``."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

from esn.errors import EsnError
from esn.files import sha256_file
from esn.pipeline import convert, select
from esn.pipeline.batches import chunks
from esn.pipeline.config import settings
from esn.pipeline.files import atomic_write_json, read_sealed, refuse_non_file, seal
from esn.pipeline.grid import BASELINE, EvalAttempt, grid, summarize
from esn.pipeline.run import Run


def attempts(run: Run) -> list[EvalAttempt]:
    """Every attempt of the grid, split by split, in a fixed order (batches are cut from it)."""
    sts = settings(run.cfg)
    skip = select.no_success(run)  # masks of emotions without a success set were not selected
    out: list[EvalAttempt] = []
    for split in run.cfg.evaluate.splits:
        out += grid(split, [s.id for s in run.sources(split)], run.cfg.record.targets, sts, skip)
    return out


def evaluate(run: Run) -> bool:
    """Run this process's batches of the grid; summarise into results.json once the whole grid is done.

    Returns whether results.json was written (a static shard that finishes before the others does not)."""
    from esn.wer import wer

    cfg = run.cfg
    out_dir = run.rundir.evaluate
    grid_attempts = attempts(run)
    by_id = {s.id: s for split in cfg.evaluate.splits for s in run.sources(split)}
    sts = {st.key: st for st in settings(cfg)}
    batches = list(chunks(grid_attempts, cfg.evaluate.batch_size))
    bdir = out_dir / "batches"

    def done(k: int, batch) -> bool:
        return finished(out_dir, bdir / f"{k:06d}.json", batch)

    run.team.on_leader(lambda: check_masks(run, {st.mask_key for st in sts.values()}))  # one writer of masks.json
    mine = [(k, b) for k, b in batches if run.team.mine(k)]

    def plan() -> list[int]:
        todo = [k for k, b in mine if not done(k, b)]
        run.begin("evaluate", under_way=bool(todo))
        return todo

    todo = run.team.agree(plan)
    if todo:
        mask_cache = {key: select.masks(run, st.mask_key, run.adapter.layout([st.stream])).masks
                      for key, st in sts.items()}
        run.load_judges()  # before the clock starts, and a bad judge fails before any work
        conversions = sum(len(batches[k][1]) for k in todo)
        with run.team.share("evaluate", todo, total=len(mine), conversions=conversions,
                            console=run.console) as claims:
            for k in claims:
                t0 = time.perf_counter()
                batch = batches[k][1]
                rows = [(a.id, by_id[a.source], a.target) for a in batch]
                reqs = convert.requests(rows)
                # A selector may keep no neuron for an emotion (CAS, LAPE): those cells run unsteered.
                conds = [None if a.setting == BASELINE or not len(mask_cache[a.setting][a.mask])
                         else (mask_cache[a.setting][a.mask], sts[a.setting]) for a in batch]
                results = steered_generate(run.adapter, reqs, conds, convert.generation(run, "evaluate", batch[0].id),
                                           positions=cfg.evaluate.positions)
                t1 = time.perf_counter()
                labels, quality = convert.judge(run, results, reqs)
                t2 = time.perf_counter()
                records = []
                for a, res, lab, q in zip(batch, results, labels, quality, strict=True):
                    audio = convert.save_audio(out_dir, a.id, res) if cfg.evaluate.save_audio else {"audio": None}
                    ref = by_id[a.source].transcript
                    records.append({"id": a.id, "split": a.split, "setting": a.setting, "mask": a.mask,
                                    "source": a.source, "target": a.target, "reference": ref, "text": res.text,
                                    "wer": round(wer(ref, res.text), 6), "labels": lab, "quality": q, **audio})
                write_batch(bdir / f"{k:06d}.json", records)
                claims.done(len(batch), generate=t1 - t0, judge=t2 - t1, store=time.perf_counter() - t2)
        run.team.settle([bdir / f"{k:06d}.json" for k in todo])
    tag = run.team.tag
    if run.shard is not None:
        # Checked after this shard's last write: of shards finishing together, the last sees every batch.
        # Two that both see it write the same bytes (a seeded summary), each atomically.
        missing = sum(not done(k, b) for k, b in batches)
        if missing:
            run.console.print(
                f"evaluate{tag}: this shard's {len(mine)} batches are done; {missing} of {len(batches)} "
                "batches of the grid are still missing. results.json will be written by the last shard to "
                "finish, or by `esn evaluate` without --shard.")
            return False

    def finish() -> None:
        write_results(run, grid_attempts)
        run.begin("evaluate", under_way=False)

    run.team.on_leader(finish)
    if run.shard is not None:
        run.console.print(f"evaluate{tag}: the grid is complete; wrote {out_dir / 'results.json'}", markup=False)
    return True


def write_results(run: Run, grid_attempts: list[EvalAttempt] | None = None) -> None:
    """The metrics of the complete grid (``esn.pipeline.grid.summarize``) -> ``evaluate/results.json``."""
    from esn.wer import corpus_wer

    cfg = run.cfg
    sts = {st.key: st for st in settings(cfg)}
    judges = [j.name for j in cfg.judges.emotion]
    results = summarize(
        records(run, grid_attempts), list(sts), cfg.record.targets, judges, cfg.evaluate.splits,
        n_boot=cfg.evaluate.bootstrap, seed=cfg.seed, wer_fn=lambda refs, hyps: corpus_wer(refs, hyps).wer,
    )
    meta = {"settings": {k: vars(st) for k, st in sts.items()}, "targets": cfg.record.targets, "judges": judges,
            "splits": cfg.evaluate.splits, "bootstrap": cfg.evaluate.bootstrap,
            "quality_judge": None if cfg.judges.quality is None else cfg.judges.quality.name,
            "positions": {"record": cfg.record.positions, "evaluate": cfg.evaluate.positions}}
    atomic_write_json(run.rundir.evaluate / "results.json", seal({"meta": meta, "groups": results}))


def results(path: Path) -> dict:
    """``evaluate/results.json`` (``{"meta", "groups"}``), checked against its checksum: a damaged or edited
    file is an EsnError, never a report."""
    return read_sealed(path, "run `esn evaluate` to write it again")


def records(run: Run, grid_attempts: list[EvalAttempt] | None = None) -> list[dict]:
    """Every evaluated conversion, in grid order; a missing or foreign batch file is a clear error."""
    grid_attempts = grid_attempts if grid_attempts is not None else attempts(run)
    out: list[dict] = []
    for k, batch in chunks(grid_attempts, run.cfg.evaluate.batch_size):
        path = run.rundir.evaluate / "batches" / f"{k:06d}.json"
        if not path.exists():
            raise EsnError(f"evaluation batch {path} is missing: run `esn evaluate` to finish the grid")
        rows = read_batch(path, "run `esn evaluate` to compute it again")
        if [r.get("id") for r in rows] != [a.id for a in batch]:
            raise EsnError(f"evaluation batch {path} belongs to another grid: run `esn evaluate` to redo it")
        out += rows
    return out


BATCH_FORMAT = "esn-eval-batch/1"


def write_batch(path: Path, records: list[dict]) -> Path:
    """One batch's records, sealed (``esn.pipeline.files.seal``): a damaged or edited file is never trusted."""
    return atomic_write_json(path, seal({"format": BATCH_FORMAT, "records": records}))


def read_batch(path: Path, fix: str) -> list[dict]:
    """The records of a batch file ``write_batch`` wrote, checked against its checksum; EsnError otherwise."""
    body = read_sealed(path, fix)
    rows = body.get("records")
    if body.get("format") != BATCH_FORMAT or not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise EsnError(f"{path} is not an esn evaluation batch ({BATCH_FORMAT}); {fix}")
    return rows


def finished(out_dir: Path, path: Path, batch) -> bool:
    """Whether batch file ``path`` holds exactly ``batch``, with every wav it names, each checked against the
    sha256 recorded with it. A damaged or edited file, a missing or damaged wav means the batch is done
    again (same seed, same result; a warning names the file), never that it is trusted; a folder in the
    place of either is refused before any work."""
    refuse_non_file(path, "an evaluation batch")
    if not path.exists():
        return False
    try:
        rows = read_batch(path, "it will be computed again")
        ids = [r["id"] for r in rows]
    except (EsnError, KeyError) as exc:
        warnings.warn(f"{path} is damaged and will be computed again ({exc})", stacklevel=2)
        return False
    if ids != [a.id for a in batch]:
        return False
    for row in rows:
        name = row.get("audio")
        if name is None:
            continue
        wav = out_dir / name
        refuse_non_file(wav, "a wav of an evaluation batch")
        problem = ("is missing" if not wav.exists() else
                   None if sha256_file(wav) == row.get("audio_sha256") else "is damaged or was replaced")
        if problem is not None:
            warnings.warn(f"{wav} {problem}: batch {path.name} will be computed again", stacklevel=2)
            return False
    return True


def check_masks(run: Run, keys) -> None:
    """The masks of ``keys`` must be the ones every evaluated batch so far was steered with.

    ``evaluate/masks.json`` keeps their sha256 from the first batch on. When ``esn select`` has since
    written different masks (new recordings, new human labels), the batches already there are stale:
    refuse rather than mix conversions steered by two mask sets."""
    current = select.mask_digests(run, sorted(keys))
    path = run.rundir.evaluate / "masks.json"
    if path.exists():  # the only record of which masks steered the batches there: damage is refused
        used = read_sealed(path, f"it records which masks steered the batches in {run.rundir.evaluate}; delete "
                                 "that folder to evaluate again, or use a new run_dir")
        changed = sorted(k for k in current if isinstance(used, dict) and k in used and used[k] != current[k])
        if changed or not isinstance(used, dict):
            raise EsnError(
                f"evaluate/ holds conversions steered with other masks than select/ holds now ({', '.join(changed)}"
                f" changed since; `esn select` ran again). Delete {run.rundir.evaluate} to evaluate the new "
                "masks, or use a new run_dir.")
        current = {**used, **current}
    atomic_write_json(path, seal(current))


def steered_generate(adapter, reqs, conds, gen, *, positions: str = "all"):
    """Generate with a per-row condition (None = no intervention): one batch if the adapter is batched.

    ``positions="generated"`` leaves the prompt's forward alone and edits the generated steps only."""
    from esn.steering import Condition, steer, steer_rows

    if adapter.batched:
        rows = [None if c is None else Condition(c[0], c[1].method, c[1].alpha) for c in conds]
        with steer_rows(adapter, rows, positions=positions):
            return adapter.generate(reqs, gen)
    out = []
    for req, c in zip(reqs, conds, strict=True):
        if c is None:
            out += adapter.generate([req], gen)
        else:
            with steer(adapter, c[0], c[1].method, c[1].alpha, positions=positions):
                out += adapter.generate([req], gen)
    return out
