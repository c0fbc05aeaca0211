"""Stage 2, select: filter the recorded attempts (judge label == target, WER <= tau, capped at c), aggregate
activation statistics, and select one neuron mask set per recipe of the grid. Results go to ``select/``.

Masks are selected within one stream (``lm`` or ``synth``), never by one ranking across both: P, floor(r·N),
LAPE's percentile and Random's draw are all per stream. P counts the positions ``record.positions`` names
(a recipe of ``sweep.positions`` the other ones). Selector options come from ``[selectors.<name>]`` and are
written into each mask file's metadata.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from esn.errors import EsnError
from esn.pipeline import record
from esn.pipeline.config import Recipe, mask_recipes, settings
from esn.pipeline.files import atomic_write_json, read_sealed, seal
from esn.pipeline.run import Run


def success_sets(run: Run, c: int, labels: str):
    """The filtered, capped success sets (``FilterResult``). An emotion without a success is left out of
    selection (its masks are empty and reports say "no success set", as the paper's hard emotions may be);
    only when no emotion has one is it an error."""
    from esn.filtering import filter_attempts, load_label_csv

    records = record.store(run).records()
    f = run.cfg.filter
    targets = run.cfg.record.targets
    if labels == "human":
        judged = load_label_csv(f.human_labels)
        who = f"human labels in {f.human_labels}"
    else:
        judged = {r.id: r.meta.get("label") for r in records}
        who = f"judge {run.filter_judge!r}"
    text_out = (record.prompts(run) or {}).get("text_out", True)  # no text out: the judge alone (no ASR here)
    result = filter_attempts(records, judged, tau_wer=f.tau_wer, cap=c, seed=run.cfg.seed, emotions=targets,
                             require_match=f.require_match, check_wer=text_out)
    empty = [e for e in targets if not result.success.get(e)]
    if len(empty) == len(targets):
        raise EsnError(
            f"no successful conversion for {', '.join(empty)} among {len(records)} recorded attempts "
            f"({who} must give the target emotion{'' if f.require_match else ' (not required here)'} and "
            f"WER <= tau_wer={f.tau_wer:g}). Every record is kept in {run.rundir.record}; record more sources, "
            f"or relax [filter], then run `esn select` again."
        )
    return result


class _Stats:
    """Success sets and aggregated statistics of one run, computed once per (c, labels, positions)."""

    def __init__(self, run: Run):
        self.run = run
        self.store = record.store(run)
        self.sets: dict[tuple[int, str], Any] = {}
        self.stats: dict[str, Any] = {}
        self.ready: dict[str, Any] = {}  # aggregated by prefetch, not yet used
        self.written: list[Path] = []  # statistics and mask files this select wrote (summary.json lists them)

    def success(self, c: int, labels: str):
        if (c, labels) not in self.sets:
            result = success_sets(self.run, c, labels)
            _write_verdicts(result, self.run.rundir.select / f"verdicts_c{c}_{labels}.csv")
            self.sets[(c, labels)] = result
        return self.sets[(c, labels)]

    def prefetch(self, recipes) -> None:
        """Aggregate the statistics of every recipe's key in one pass over the store (each shard read once,
        not once per key: at paper scale the keys of c and positions re-read most shards). Keys whose success
        sets fail are left to ``of``, which raises their error where a recipe first needs them."""
        from esn.statistics import aggregate_each

        todo = {}
        for recipe in recipes:
            if recipe.stats_key in self.stats or recipe.stats_key in todo:
                continue
            try:
                todo[recipe.stats_key] = (_present(self.success(recipe.c, recipe.labels).success), recipe.positions)
            except EsnError:
                continue
        if len(todo) > 1:
            self.ready = dict(zip(todo, aggregate_each(self.store, list(todo.values())), strict=True))

    def of(self, recipe: Recipe):
        """``ActivationStats`` over every recorded stream, written to ``stats_<stats_key>.safetensors`` once per select."""
        from esn import artifacts
        from esn.statistics import aggregate

        key = recipe.stats_key
        if key not in self.stats:
            cfg = self.run.cfg
            result = self.success(recipe.c, recipe.labels)
            stats = self.ready.pop(key, None)
            if stats is None:
                stats = aggregate(self.store, _present(result.success), positions=recipe.positions)
            elif isinstance(stats, EsnError):
                raise stats
            stats.meta = {"source_run": "record", "c": recipe.c, "labels": recipe.labels, "seed": cfg.seed,
                          "tau_wer": cfg.filter.tau_wer, "positions": recipe.positions}
            path = self.run.rundir.select / f"stats_{key}.safetensors"
            artifacts.save_stats(path, stats)  # always: a file from an earlier select may be stale
            self.written.append(path)
            self.stats[key] = stats
        return self.stats[key]


def select(run: Run) -> None:
    """Filter, aggregate and select: one statistics file per (c, labels, positions), one mask set per recipe.

    Everything is recomputed from the recorded attempts every time (aggregation reads them anyway), so a
    changed record store or label file can never leave stale statistics or masks behind. ``summary.json``
    is written last, with the sha256 of every file it vouches for: evaluate uses masks only when they
    are the ones a finished select wrote."""
    from esn import artifacts
    from esn.files import sha256_file

    cfg = run.cfg
    out = run.rundir.select
    cache = _Stats(run)
    anchor = settings(cfg)[0].recipe
    cache.prefetch([*mask_recipes(cfg), *(replace(anchor, positions=p) for p in ("all", "generated"))])
    summary: dict[str, Any] = {"success_sets": {}, "no_success": {}, "masks": {}, "files": {}}
    for recipe in mask_recipes(cfg):
        stats = cache.of(recipe)
        sets = cache.success(recipe.c, recipe.labels).success
        summary["success_sets"][f"c{recipe.c}_{recipe.labels}"] = sets
        summary["no_success"][recipe.key] = [e for e in cfg.record.targets if not sets.get(e)]
        path = out / f"masks_{recipe.key}.safetensors"
        chosen, options = choose(run, stats, recipe)
        artifacts.save_masks(path, chosen, layout=stats.layout.select([recipe.stream]), meta={
            "architecture": cache.store.architecture, "selector": recipe.selector, "r": recipe.rate,
            "c": recipe.c, "tau_wer": cfg.filter.tau_wer,
            "judge": "human" if recipe.labels == "human" else run.filter_judge, "seed": cfg.seed,
            "source_run": "record", "stream": recipe.stream, "positions": recipe.positions,
            "selector_options": options})
        cache.written.append(path)
        summary["masks"][recipe.key] = {e: len(m) for e, m in chosen.items()}
    if cfg.filter.human_labels is not None:
        _human_similarity(run)
    _positions_ablation(run, cache)
    summary["files"] = {p.name: sha256_file(p) for p in cache.written}
    atomic_write_json(out / "summary.json", seal(summary))


def _present(sets: dict[str, list]) -> dict[str, list]:
    """The success sets that hold attempts: an emotion with "no success set" is not aggregated."""
    return {e: ids for e, ids in sets.items() if ids}


def choose(run: Run, stats, recipe: Recipe) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Select ``recipe`` on its own stream's neurons: ``({emotion: indices in that stream}, options used)``."""
    from esn.plugins import registry
    from esn.selection import needs_moments, select_neurons

    options = dict(run.cfg.selectors.get(recipe.selector, {}))
    if recipe.quantile is not None:  # a point of the LAPE percentile sweep
        options["quantile"] = recipe.quantile
    stream = stats.select_streams([recipe.stream])
    if needs_moments(registry().selector(recipe.selector)):
        options["moments"] = _moments(run, stream, recipe)
    chosen = select_neurons(stream.probs(), recipe.selector, recipe.rate, emotions=stream.emotions,
                            seed=run.cfg.seed, **options)
    options.pop("moments", None)  # data, not an option: the mask files' metadata lists options only
    none = np.zeros(0, dtype=np.int64)  # an emotion without a success set: nothing selected, nothing steered
    return {e: chosen.get(e, none) for e in run.cfg.record.targets}, options


def no_success(run: Run) -> dict[str, list[str]]:
    """``{mask key: emotions without a success set}`` from the last select (empty lists when every emotion
    had one; ``{}`` for a select of an older esn)."""
    path = run.rundir.select / "summary.json"
    return read_sealed(path, "run `esn select` to write it again").get("no_success", {}) if path.exists() else {}


def _moments(run: Run, stats, recipe: Recipe):
    """The gate moments a selector needs, or an error saying why there are none and how to get them."""
    if stats.S is not None:
        return stats.moments()
    if recipe.positions == "generated":
        raise EsnError(f"selector {recipe.selector!r} needs the gate moments, which are stored for all positions "
                       "only: it cannot select on the generated positions (record.positions / sweep.positions)")
    raise EsnError(
        f"selector {recipe.selector!r} needs the gate moments (sums and sums of squares per neuron), but attempts "
        f"in {run.rundir.record} were recorded without them (record.moments = \"auto\" stores them only when a "
        "configured selector needs them, at 8 more bytes a neuron per attempt). Record again with this selector "
        "in the config, or record.moments = true, into a new run_dir (or move record/ away), then run `esn select`")


def mask_digests(run: Run, keys) -> dict[str, str]:
    """``{mask key: sha256}`` of the mask files of ``keys``, checked against the ``summary.json`` of the
    select that wrote them: a select killed half-way or a file changed since is an error, not a silent mix."""
    from esn.files import sha256_file

    path = run.rundir.select / "summary.json"
    if not path.exists():
        raise EsnError(f"{path} not found: run `esn select` first")
    listed = read_sealed(path, "run `esn select` to write it again").get("files")
    out = {}
    for key in keys:
        name = f"masks_{key}.safetensors"
        file = run.rundir.select / name
        if not file.exists():
            raise EsnError(f"mask file not found: {file}; run `esn select` first")
        digest = sha256_file(file)
        if not isinstance(listed, dict) or listed.get(name) != digest:
            raise EsnError(f"{file} is not the mask file the last finished `esn select` wrote (it was interrupted, "
                           "or the file was changed): run `esn select` again")
        out[key] = digest
    return out


def masks(run: Run, mask_key: str, layout=None):
    """The ``MaskSet`` of one recipe, as saved by the select stage (checked against ``layout`` if given)."""
    from esn import artifacts

    path = run.rundir.select / f"masks_{mask_key}.safetensors"
    if not path.exists():
        raise EsnError(f"mask file not found: {path}; run `esn select` first")
    return artifacts.load_masks(path, layout)


def _human_similarity(run: Run) -> None:
    """Table 5: anchor masks from human- vs judge-filtered successes, per emotion."""
    from esn import analysis

    anchor = settings(run.cfg)[0].recipe
    ser = masks(run, anchor.key)
    hum = masks(run, replace(anchor, labels="human").key)
    both = [e for e in ser.masks if len(ser.masks[e]) and len(hum.masks.get(e, ()))]
    if not both:
        return
    table = analysis.compare({e: ser.masks[e] for e in both}, {e: hum.masks[e] for e in both}, ser.layout)
    out = {e: {"no_success": True} for e in ser.masks if e not in both}  # an empty mask: no success set
    atomic_write_json(run.rundir.select / "human_similarity.json",
                      seal({**out, **{e: vars(v) for e, v in table.items()}}))


def _positions_ablation(run: Run, cache: _Stats) -> None:
    """Per stream: the prompt's share of the counted positions, and how far the anchor's masks move when P
    counts the generated positions only (``select/positions.json``; skipped for stores without the split)."""
    from esn import analysis

    anchor = settings(run.cfg)[0].recipe
    both = {p: replace(anchor, positions=p) for p in ("all", "generated")}
    try:
        stats = {p: cache.of(r) for p, r in both.items()}
    except EsnError:  # recorded before the prompt/generated split was stored
        return
    out: dict[str, Any] = {"anchor": anchor.key.replace("_gen", ""), "streams": {}}
    for stream in run.cfg.model.streams:
        sub = {p: s.select_streams([stream]) for p, s in stats.items()}
        entry: dict[str, Any] = {"prompt_share": {}}
        for k, e in enumerate(sub["all"].emotions):
            t_all, t_gen = int(sub["all"].T[k].sum()), int(sub["generated"].T[k].sum())
            entry["prompt_share"][e] = None if t_all == 0 else round(1 - t_gen / t_all, 6)
        try:
            chosen = {p: choose(run, stats[p], replace(r, stream=stream))[0] for p, r in both.items()}
            chosen = {p: {e: m for e, m in c.items() if e in sub["all"].emotions} for p, c in chosen.items()}
            table = analysis.compare(chosen["all"], chosen["generated"], sub["all"].layout)
        except EsnError as exc:  # e.g. a stream without generated positions, or an empty mask
            entry["error"] = str(exc)
        else:
            entry["overlap"] = {e: {"jaccard": round(v.jaccard, 6), "direct_match": round(v.direct_match, 6)}
                                for e, v in table.items()}
        out["streams"][stream] = entry
    atomic_write_json(run.rundir.select / "positions.json", seal(out))


def _write_verdicts(result, path: Path) -> None:
    result.write_csv(path)
