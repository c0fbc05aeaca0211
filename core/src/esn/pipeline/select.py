"""Stage 2, select: filter the recorded attempts (judge label == target, WER <= tau, capped at c), aggregate
activation statistics, and select one neuron mask set per recipe of the grid. Results go to ``select/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from esn.errors import EsnError
from esn.pipeline import record
from esn.pipeline.config import Setting, mask_recipes, settings
from esn.pipeline.files import atomic_write_json
from esn.pipeline.run import Run


def success_sets(run: Run, c: int, labels: str):
    """The filtered, capped success sets (``FilterResult``); an empty emotion is a clear error."""
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
    result = filter_attempts(records, judged, tau_wer=f.tau_wer, cap=c, seed=run.cfg.seed, emotions=targets,
                             require_match=f.require_match)
    empty = [e for e in targets if not result.success.get(e)]
    if empty:
        raise EsnError(
            f"no successful conversion for {', '.join(empty)} among {len(records)} recorded attempts "
            f"({who} must give the target emotion{'' if f.require_match else ' (not required here)'} and "
            f"WER <= tau_wer={f.tau_wer:g}). Every record is kept in {run.rundir.record}; record more sources, "
            f"or relax [filter], then run `esn select` again."
        )
    return result


def select(run: Run) -> None:
    """Filter, aggregate and select: one statistics file per (c, labels), one mask set per recipe."""
    from esn import artifacts
    from esn.selection import select_neurons
    from esn.statistics import aggregate

    cfg = run.cfg
    targets = cfg.record.targets
    out = run.rundir.select
    store = record.store(run)
    stats_cache: dict[tuple[int, str], Any] = {}
    summary: dict[str, Any] = {"success_sets": {}, "masks": {}}
    for selector, rate, c, labels in mask_recipes(cfg):
        key = Setting(selector, rate, c, labels, "", 0.0).mask_key
        if (c, labels) not in stats_cache:
            result = success_sets(run, c, labels)
            name = f"c{c}_{labels}"
            summary["success_sets"][name] = result.success
            _write_verdicts(result, out / f"verdicts_{name}.csv")
            stats = aggregate(store, result.success)
            stats.meta = {"source_run": "record", "c": c, "labels": labels, "seed": cfg.seed,
                          "tau_wer": cfg.filter.tau_wer}
            stats_path = out / f"stats_{name}.safetensors"
            if not stats_path.exists():
                artifacts.save_stats(stats_path, stats)
            stats_cache[(c, labels)] = stats
        stats = stats_cache[(c, labels)]
        path = out / f"masks_{key}.safetensors"
        if not path.exists():
            chosen = select_neurons(stats.probs(), selector, rate, emotions=stats.emotions, seed=cfg.seed)
            artifacts.save_masks(path, {e: chosen[e] for e in targets}, layout=stats.layout, meta={
                "architecture": store.architecture, "selector": selector, "r": rate, "c": c,
                "tau_wer": cfg.filter.tau_wer, "judge": "human" if labels == "human" else run.filter_judge,
                "seed": cfg.seed, "source_run": "record"})
        summary["masks"][key] = {e: len(m) for e, m in masks(run, key).masks.items()}
    if cfg.filter.human_labels is not None:
        _human_similarity(run)
    atomic_write_json(out / "summary.json", summary)


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

    a = settings(run.cfg)[0]
    ser = masks(run, Setting(a.selector, a.rate, a.c, "ser", "", 0.0).mask_key)
    hum = masks(run, Setting(a.selector, a.rate, a.c, "human", "", 0.0).mask_key)
    table = analysis.compare(ser.masks, hum.masks, ser.layout)
    atomic_write_json(run.rundir.select / "human_similarity.json", {e: vars(v) for e, v in table.items()})


def _write_verdicts(result, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    result.write_csv(tmp)
    tmp.replace(path)
