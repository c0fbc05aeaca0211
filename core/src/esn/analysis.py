"""Mask analyses of the paper: ESNs per layer (Figure 9) and the similarity of two masks (Table 5).

Table 5 compares, per emotion, the mask found from SER-filtered attempts (A) with the one found from
human-filtered attempts (B):

* Jaccard ``|A ∩ B| / |A ∪ B|``;
* direct match rate ``|A ∩ B| / |A|``: the share of A's neurons that B selects too. With ``|A| = |B|``
  (one selector, one r) it equals ``|A ∩ B| / |B|`` and Jaccard is ``D / (2 - D)``; every row of the
  paper's table satisfies that (35.71% -> 0.217, 13.95% -> 0.075, 19.57% -> 0.109, 13.27% -> 0.071), which
  is how we read its definition;
* Jensen–Shannon divergence of the two masks' distributions over hook points (layers), base 2, so it lies
  in [0, 1] (divide by ln 2 ≈ 0.693 to compare with a natural-log JSD); not its square root (the JS
  distance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from esn.errors import EsnError
from esn.hookpoints import Layout
from esn.masks import Mask


def _indices(mask: Mask | np.ndarray) -> np.ndarray:
    return mask.indices if isinstance(mask, Mask) else np.unique(np.asarray(mask, dtype=np.int64))


def per_hook_point(mask: Mask | np.ndarray, layout: Layout) -> np.ndarray:
    """Selected neurons per hook point ``[H]`` int64, in layout order."""
    idx = _indices(mask)
    if idx.size and (idx.min() < 0 or idx.max() >= layout.n_neurons):
        raise EsnError(f"mask index out of range 0..{layout.n_neurons - 1}")
    which = np.searchsorted(layout.offsets, idx, side="right") - 1
    return np.bincount(which, minlength=len(layout)).astype(np.int64)


def layer_counts(masks: dict[str, Mask | np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
    """Figure 9: ``{stream: counts [E, L]}``, ESNs per emotion (rows in ``masks`` order) and layer.

    ``L`` is one more than the stream's highest instrumented layer; layers without a hook point are 0.
    """
    out = {}
    for stream in layout.streams:
        hps = [(i, hp.layer) for i, hp in enumerate(layout.hook_points) if hp.stream == stream]
        table = np.zeros((len(masks), max(layer for _, layer in hps) + 1), dtype=np.int64)
        for e, mask in enumerate(masks.values()):
            counts = per_hook_point(mask, layout)
            for i, layer in hps:
                table[e, layer] += counts[i]
        out[stream] = table
    return out


def jaccard(a: Mask | np.ndarray, b: Mask | np.ndarray) -> float:
    """``|A ∩ B| / |A ∪ B|``; two empty masks are identical (1.0)."""
    a, b = _indices(a), _indices(b)
    union = np.union1d(a, b).size
    return 1.0 if union == 0 else np.intersect1d(a, b).size / union


def direct_match(a: Mask | np.ndarray, b: Mask | np.ndarray) -> float:
    """``|A ∩ B| / |A|``: the share of A's neurons also in B (A is the reference mask)."""
    a, b = _indices(a), _indices(b)
    if a.size == 0:
        raise EsnError("direct match rate of an empty reference mask is undefined")
    return np.intersect1d(a, b).size / a.size


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """JSD (base 2) of two count or probability vectors; each is normalised to sum to 1."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.shape != q.shape or p.sum() <= 0 or q.sum() <= 0 or p.min() < 0 or q.min() < 0:
        raise EsnError("JSD needs two non-negative vectors of one shape, each with a positive sum")
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(x):
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    return max(0.0, (kl(p) + kl(q)) / 2)


def layer_jsd(a: Mask | np.ndarray, b: Mask | np.ndarray, layout: Layout) -> float:
    """JSD (base 2) of the two masks' distributions over the layout's hook points."""
    return jensen_shannon(per_hook_point(a, layout), per_hook_point(b, layout))


@dataclass(frozen=True)
class Similarity:
    """Table 5 numbers for one emotion: Jaccard overlap, direct match and per-layer JSD of two masks."""
    jaccard: float
    direct_match: float
    jsd: float


def compare(a: dict[str, Mask | np.ndarray], b: dict[str, Mask | np.ndarray], layout: Layout) -> dict[str, Similarity]:
    """Table 5: per emotion in both mask sets, ``a`` the reference (e.g. SER-filtered), ``b`` the other;
    an ``"average"`` row (plain mean over emotions) is added."""
    common = [e for e in a if e in b]
    if not common:
        raise EsnError(f"the mask sets share no emotion ({list(a)} vs {list(b)})")
    rows = {e: Similarity(jaccard(a[e], b[e]), direct_match(a[e], b[e]), layer_jsd(a[e], b[e], layout))
            for e in common}
    rows["average"] = Similarity(*(float(np.mean([getattr(r, f) for r in rows.values()]))
                                   for f in ("jaccard", "direct_match", "jsd")))
    return rows


def expert_counts(masks: dict[str, Mask | np.ndarray], layout: Layout) -> tuple[list[str], np.ndarray]:
    """The layer x expert view of masks: routed hook points (rows, ``"lm 3"``) x experts (columns), per
    emotion: ``(names, counts [E, R, X])`` float, X the largest expert count (NaN where a layer has fewer
    experts). Selected neurons of expert ``x`` at a routed hook point are its local indices ``x*d ..``."""
    routed = [(i, hp) for i, hp in enumerate(layout.hook_points) if hp.routed]
    if not routed:
        raise EsnError("the layout has no routed (mixture-of-experts) hook point")
    width = max(hp.experts for _, hp in routed)
    out = np.full((len(masks), len(routed), width), np.nan)
    for e, mask in enumerate(masks.values()):
        idx = _indices(mask)
        for r, (i, hp) in enumerate(routed):
            local = idx[(idx >= layout.offsets[i]) & (idx < layout.offsets[i + 1])] - layout.offsets[i]
            out[e, r, :hp.experts] = np.bincount(local // hp.unit_width, minlength=hp.experts)
    names = [f"{hp.stream} {hp.layer}" for _, hp in routed]
    return names, out


def index_counts(masks: dict[str, Mask | np.ndarray], layout: Layout) -> tuple[list[str], np.ndarray]:
    """The index x layer view of masks: indices (rows: codebook positions, substep indices) x indexed hook
    points (columns, ``"synth 3"``), per emotion: ``(names, counts [E, X, R])`` float, X the largest index
    count (NaN where a layer has fewer indices). Neuron ``(k, u)`` is local index ``k * d + u``."""
    indexed = [(i, hp) for i, hp in enumerate(layout.hook_points) if hp.indexed]
    if not indexed:
        raise EsnError("the layout has no indexed hook point (one MLP weight set per index)")
    width = max(hp.indices for _, hp in indexed)
    out = np.full((len(masks), width, len(indexed)), np.nan)
    for e, mask in enumerate(masks.values()):
        idx = _indices(mask)
        for r, (i, hp) in enumerate(indexed):
            local = idx[(idx >= layout.offsets[i]) & (idx < layout.offsets[i + 1])] - layout.offsets[i]
            out[e, :hp.indices, r] = np.bincount(local // hp.unit_width, minlength=hp.indices)
    return [f"{hp.stream} {hp.layer}" for _, hp in indexed], out


@dataclass(frozen=True)
class RoutingRow:
    """One emotion's routing: its most over-routed experts (vs. the mean over emotions) and how far its
    routing distribution is from the other emotions' (JSD, base 2, averaged over routed hook points)."""

    emotion: str
    positions: int  # positions of its success set at the first routed hook point
    top: list[tuple[str, int, float, float]]  # (hook point, expert, frequency, mean frequency of all emotions)
    jsd: float


def routing_table(stats, top: int = 3) -> list[RoutingRow]:
    """Per emotion of ``stats`` (``esn.statistics.ActivationStats``), its routing as a table row."""
    freq = stats.routing()  # {hook point: [E, experts]}
    if not freq:
        raise EsnError("the statistics have no routed (mixture-of-experts) hook point")
    positions = stats.hook_point_positions()
    first = stats.layout.index(next(iter(freq)))
    rows = []
    for e, emotion in enumerate(stats.emotions):
        ratios, jsds = [], []
        for name, f in freq.items():
            mean = f.mean(axis=0)
            others = np.delete(f, e, axis=0).mean(axis=0) if f.shape[0] > 1 else mean
            if f[e].sum() > 0 and others.sum() > 0:
                jsds.append(jensen_shannon(f[e], others))
            for x in range(f.shape[1]):
                if mean[x] > 0:
                    ratios.append((f[e, x] / mean[x], name, x, float(f[e, x]), float(mean[x])))
        ratios.sort(key=lambda r: (-r[0], r[1], r[2]))
        rows.append(RoutingRow(emotion, int(positions[e, first]), [(n, x, fx, m) for _, n, x, fx, m in ratios[:top]],
                               float(np.mean(jsds)) if jsds else float("nan")))
    return rows
