"""The evaluation grid of the paper (section 3.5) and its metrics.

For each split, every source is converted to every target emotion once without intervention (the
baseline) and once per (setting, mask emotion): the 4 x 4 (mask emotion x target emotion) cells of
Figure 3. From the judged results:

* match rate per judge and cell; Delta = cell - baseline of the same target (percentage points);
* self-effect = mean of the diagonal Deltas, cross-effect = mean of the off-diagonal Deltas, gap = self - cross;
  ``all`` = mean of all T x T Deltas (the one figure the paper prints for Random, whose masks are not
  emotion-specific);
* WER (corpus WER of decoded text vs transcript, %) pooled over all T x T cells (``wer``) and over the
  self cells only (``wer_self``), naturalness (mean judge MOS over the scored clips), and their Deltas;
* how many clips each judge could not score (no label: a miss; no MOS: left out of the mean);
* the baseline's predicted-label distribution per target (the paper's section 5.1: "neutral is
  frequently predicted");
* 95 % bootstrap CIs, resampling source utterances (paired: the same resample for baseline and
  intervention), seeded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from esn.pipeline.batches import derive_seed
from esn.pipeline.config import Setting

BASELINE = "baseline"


@dataclass(frozen=True)
class EvalAttempt:
    """One conversion of the grid. ``setting`` is a Setting key or ``"baseline"``; ``mask`` its emotion."""

    split: str
    setting: str
    mask: str | None
    source: str
    target: str

    @property
    def id(self) -> str:
        """``split|setting|mask|source|target``: the attempt's key in the evaluation store."""
        return f"{self.split}|{self.setting}|{self.mask or '-'}|{self.source}|{self.target}"


def grid(split: str, sources: Sequence[str], targets: Sequence[str], settings: Sequence[Setting],
         no_success: Mapping[str, Sequence[str]] | None = None) -> list[EvalAttempt]:
    """Every attempt of one split, baseline first, in a fixed order (batches are cut from this order).

    ``no_success``: ``{mask key: emotions without a success set}``; their masks were not selected, so their
    mask rows are left out (every target is still converted: the baseline and the other masks' cells)."""
    no_success = no_success or {}
    out = [EvalAttempt(split, BASELINE, None, s, t) for s in sources for t in targets]
    for st in settings:
        masks = [m for m in targets if m not in no_success.get(st.mask_key, ())]
        out += [EvalAttempt(split, st.key, m, s, t) for m in masks for s in sources for t in targets]
    return out


def _ci(samples: np.ndarray) -> list[float] | None:
    if samples.size == 0 or np.isnan(samples).all():
        return None
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return [round(float(lo), 6), round(float(hi), 6)]


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    """``np.nanmean`` without the warning for an all-NaN slice (a mask row without a success set): NaN."""
    n = (~np.isnan(x)).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.nansum(x, axis=axis) / np.maximum(n, 1), np.nan)


def _r(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 6)


def summarize_setting(
    records: list[dict],
    setting: str,
    targets: Sequence[str],
    judges: Sequence[str],
    *,
    n_boot: int,
    seed: int,
    wer_fn,
) -> dict:
    """Metrics of one setting on one group of records (which must contain the baseline attempts).

    Match values are percentages; Deltas percentage points. ``wer_fn(refs, hyps)`` is corpus WER.
    """
    sources = sorted({r["source"] for r in records})
    s_idx = {s: i for i, s in enumerate(sources)}
    t_idx = {t: i for i, t in enumerate(targets)}
    T, S = len(targets), len(sources)
    rng = np.random.default_rng(seed)
    # Resample weights [B, S]: how often each source appears in each bootstrap draw.
    weights = rng.multinomial(S, np.full(S, 1.0 / S), size=n_boot).astype(np.float64) if n_boot and S else None

    base = [r for r in records if r["setting"] == BASELINE]
    cells = [r for r in records if r["setting"] == setting]
    scored = cells or base
    out: dict = {"n_sources": S, "n": len(scored), "judges": {}}
    for judge in judges:
        b = np.full((T, S), np.nan)
        for r in base:
            b[t_idx[r["target"]], s_idx[r["source"]]] = float(r["labels"].get(judge) == r["target"])
        entry: dict = {"baseline": {t: _r(100 * np.nanmean(b[i])) for i, t in enumerate(targets)}}
        entry["baseline"]["avg"] = _r(100 * np.nanmean(b))
        entry["unlabelled"] = sum(r["labels"].get(judge) is None for r in scored)
        if setting == BASELINE:
            entry["predicted"] = predicted_labels(base, judge, targets)
        if setting != BASELINE:
            m = np.full((T, T, S), np.nan)  # [mask, target, source]
            for r in cells:
                m[t_idx[r["mask"]], t_idx[r["target"]], s_idx[r["source"]]] = float(r["labels"].get(judge) == r["target"])
            entry.update(_effects(m, b, targets, weights))
        out["judges"][judge] = entry
    if setting != BASELINE:
        present = {r["mask"] for r in cells}
        out["no_success"] = [t for t in targets if t not in present]  # mask rows left out of the grid
    self_cells = [r for r in cells if r["mask"] == r["target"]] or base
    out["wer"] = _r(100 * wer_fn([r["reference"] for r in scored], [r["text"] for r in scored]))
    out["wer_self"] = _r(100 * wer_fn([r["reference"] for r in self_cells], [r["text"] for r in self_cells]))
    out["wer_baseline"] = _r(100 * wer_fn([r["reference"] for r in base], [r["text"] for r in base]))
    q = [r["quality"] for r in scored if r.get("quality") is not None]
    qb = [r["quality"] for r in base if r.get("quality") is not None]
    out["quality"] = _r(float(np.mean(q))) if q else None
    out["quality_baseline"] = _r(float(np.mean(qb))) if qb else None
    out["quality_unscored"] = len(scored) - len(q)
    return out


def predicted_labels(records: list[dict], judge: str, targets: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{target: {label: % of that target's clips}}``; ``"none"`` counts clips the judge did not label."""
    out = {}
    for t in targets:
        labels = [r["labels"].get(judge) or "none" for r in records if r["target"] == t]
        out[t] = {lab: _r(100 * labels.count(lab) / len(labels)) for lab in sorted(set(labels))} if labels else {}
    return out


def _effects(m: np.ndarray, b: np.ndarray, targets: Sequence[str], weights: np.ndarray | None) -> dict:
    """Delta matrix, self/cross/gap and per-target self Deltas, with bootstrap CIs (pp). A mask row with no
    cell at all (an emotion without a success set) is left out of self, cross and all; its Deltas are None."""
    T = len(targets)
    present = ~np.isnan(m).all(axis=(1, 2))  # [T] mask rows that were evaluated
    diag = np.eye(T, dtype=bool)
    own, off = diag & present[:, None], ~diag & present[:, None]

    def stats(m_mean: np.ndarray, b_mean: np.ndarray) -> dict[str, np.ndarray]:
        # m_mean [T, T, ...], b_mean [T, ...] -> Deltas in pp
        delta = 100 * (m_mean - b_mean[None])
        delta = np.where(present.reshape(T, *[1] * (delta.ndim - 1)), delta, np.nan)
        self_ = delta[own].mean(axis=0)
        cross = delta[off].mean(axis=0)
        every = delta[present].reshape(-1, *delta.shape[2:]).mean(axis=0)
        return {"delta": delta, "self": self_, "cross": cross, "gap": self_ - cross, "all": every,
                "self_per_target": delta[diag]}

    point = stats(_nanmean(m, axis=-1), _nanmean(b, axis=-1))
    out = {
        "matrix": [[_r(point["delta"][i, j]) for j in range(T)] for i in range(T)],
        "match": [[_r(100 * v) for v in row] for row in _nanmean(m, axis=-1)],
        "self": _r(point["self"]),
        "cross": _r(point["cross"]),
        "gap": _r(point["gap"]),
        "all": _r(point["all"]),
        "self_per_target": {t: _r(point["self_per_target"][i]) for i, t in enumerate(targets)},
    }
    if weights is not None:
        n = weights.sum(axis=1)  # [B]
        mw = np.nan_to_num(m) @ weights.T / n  # [T, T, B]
        bw = np.nan_to_num(b) @ weights.T / n  # [T, B]
        boot = stats(mw, bw)
        out["ci"] = {
            "self": _ci(boot["self"]),
            "cross": _ci(boot["cross"]),
            "gap": _ci(boot["gap"]),
            "all": _ci(boot["all"]),
            "self_per_target": {t: _ci(boot["self_per_target"][i]) for i, t in enumerate(targets)},
        }
    return out


def summarize(
    records: list[dict],
    setting_keys: Sequence[str],
    targets: Sequence[str],
    judges: Sequence[str],
    splits: Sequence[str],
    *,
    n_boot: int,
    seed: int,
    wer_fn,
) -> dict:
    """``{group: {setting: metrics}}`` for each split and for all splits pooled (``"all"``)."""
    groups = {s: [r for r in records if r["split"] == s] for s in splits}
    if len(splits) > 1:
        groups["all"] = [r for r in records if r["split"] in splits]
    out: dict = {}
    for group, recs in groups.items():
        out[group] = {}
        for key in [BASELINE, *setting_keys]:
            out[group][key] = summarize_setting(
                recs, key, targets, judges, n_boot=n_boot, seed=derive_seed(seed, group, key), wer_fn=wer_fn
            )
    return out
