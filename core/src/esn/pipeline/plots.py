"""The report's figures, drawn with matplotlib's Agg backend (no display needed).

PNG bytes depend only on the data (no timestamps in the metadata), so reruns give identical files.
matplotlib is the ``plots`` extra: without it every figure function draws nothing (and removes a stale
PNG of the same name), so the report keeps its tables and says once which extra brings the figures.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

_METADATA = {"Software": None}
_F = TypeVar("_F", bound=Callable[..., Path])


def available() -> bool:
    """Whether matplotlib (the ``plots`` extra of esn-core) can be imported."""
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except ValueError:  # a module put in sys.modules without a spec (None: hidden on purpose)
        return False


def figure(draw: _F) -> _F:
    """A figure function ``draw(..., path, ...) -> path`` that, without matplotlib, returns ``path`` undrawn
    (a stale file there removed): the report leaves out images whose file does not exist."""
    signature = inspect.signature(draw)

    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        if available():
            return draw(*args, **kwargs)
        path = Path(signature.bind(*args, **kwargs).arguments["path"])
        path.unlink(missing_ok=True)
        return path

    return wrapper  # type: ignore[return-value]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "svg.hashsalt": "esn"})
    return plt


def _save(fig, path: Path) -> Path:
    """The figure as a PNG, written like every artifact (temp file, fsync, rename)."""
    from esn.files import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, bbox_inches="tight", metadata=_METADATA, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def _annotate(ax, values: np.ndarray, fmt: str, scale: float, *, dark_low: bool = False) -> None:
    """Write each value in its cell, white on dark cells (far from 0 on RdBu; low on viridis)."""
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            if np.isfinite(v):
                dark = v < 0.5 * scale if dark_low else abs(v) > 0.6 * scale
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=8, color="white" if dark else "black")


@figure
def delta_heatmaps(
    panels: Sequence[tuple[str, list[list[float | None]]]], emotions: Sequence[str], path: Path, *, title: str
) -> Path:
    """Figure 3 style: one mask-emotion x target-emotion panel of Delta match (pp) per selector/setting.

    Rows are mask emotions, columns target emotions; a shared diverging colour scale centred on 0.
    """
    plt = _plt()
    mats = [np.array([[np.nan if v is None else v for v in row] for row in m], dtype=float) for _, m in panels]
    scale = max([np.nanmax(np.abs(m)) for m in mats if np.isfinite(m).any()] + [1.0])  # at least +-1 pp
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n + 0.8, 2.9), squeeze=False)
    im = None
    labels = [e.capitalize() for e in emotions]
    for ax, (name, _), m in zip(axes[0], panels, mats, strict=True):
        im = ax.imshow(m, cmap="RdBu_r", vmin=-scale, vmax=scale)
        ax.set_title(name)
        ax.set_xticks(range(len(emotions)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(emotions)), labels if ax is axes[0][0] else [""] * len(emotions))
        ax.set_xlabel("target emotion")
        _annotate(ax, m, "+.1f", scale)
    axes[0][0].set_ylabel("mask emotion")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="Δ match (pp)")
    fig.suptitle(title, y=1.02)
    out = _save(fig, path)
    plt.close(fig)
    return out


@figure
def layer_heatmap(counts: np.ndarray, layer_names: Sequence[str], emotions: Sequence[str], path: Path, *, title: str) -> Path:
    """Figure 9 style: selected neurons per decoder layer (rows) and emotion (columns)."""
    plt = _plt()
    counts = np.asarray(counts, dtype=float)  # [layers, emotions]
    fig, ax = plt.subplots(figsize=(1.1 * len(emotions) + 2.2, 0.28 * len(layer_names) + 1.4))
    im = ax.imshow(counts, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(emotions)), [e.capitalize() for e in emotions], rotation=45, ha="right")
    ax.set_yticks(range(len(layer_names)), layer_names)
    ax.set_xlabel("mask emotion")
    ax.set_ylabel("layer")
    if counts.size <= 400:
        _annotate(ax, counts, ".0f", max(float(counts.max(initial=0)), 1.0), dark_low=True)
    fig.colorbar(im, ax=ax, label="selected neurons")
    ax.set_title(title)
    out = _save(fig, path)
    plt.close(fig)
    return out


@figure
def expert_heatmap(counts: np.ndarray, layer_names: Sequence[str], emotions: Sequence[str], path: Path, *,
                   title: str) -> Path:
    """The layer x expert view: one panel per emotion, routed layers (rows) x experts (columns), the
    selected neurons of each expert (NaN, blank: a layer with fewer experts). ``counts [E, R, X]``."""
    counts = np.asarray(counts, dtype=float)
    rows = counts.shape[1]

    def ticks(ax, first: bool) -> None:
        ax.set_xlabel("expert")
        ax.set_yticks(range(rows), layer_names if first else [""] * rows)

    return _panels(counts, emotions, path, title=title, col_inches=0.05, ticks=ticks, ylabel="routed layer")


@figure
def index_heatmap(counts: np.ndarray, layer_names: Sequence[str], emotions: Sequence[str], path: Path, *,
                  title: str) -> Path:
    """The index x layer view: one panel per emotion, indices (rows: codebook positions) x indexed layers
    (columns), the selected neurons of each (NaN, blank: a layer with fewer indices). ``counts [E, X, R]``."""
    counts = np.asarray(counts, dtype=float)
    rows, cols = counts.shape[1:]

    def ticks(ax, first: bool) -> None:
        ax.set_xticks(range(cols), layer_names, rotation=90)
        ax.set_yticks(range(rows), [str(i) for i in range(rows)] if first else [""] * rows)

    return _panels(counts, emotions, path, title=title, col_inches=0.3, ticks=ticks, ylabel="index (codebook)")


def _panels(counts: np.ndarray, emotions: Sequence[str], path: Path, *, title: str, col_inches: float, ticks,
            ylabel: str) -> Path:
    """One heatmap panel per emotion of ``counts [E, rows, cols]`` on one colour scale (NaN: blank), with
    ``ticks(ax, first_panel)`` labelling each: the expert and index views of selected neurons."""
    plt = _plt()
    n, rows, cols = counts.shape
    scale = max(float(np.nanmax(counts)) if np.isfinite(counts).any() else 0.0, 1.0)
    fig, axes = plt.subplots(1, n, figsize=(min(2.2 + col_inches * cols, 6.0) * n + 1.0, 0.25 * rows + 1.6),
                             squeeze=False)
    im = None
    for k, (ax, emotion) in enumerate(zip(axes[0], emotions, strict=True)):
        im = ax.imshow(counts[k], cmap="viridis", aspect="auto", vmin=0, vmax=scale, interpolation="nearest")
        ax.set_title(emotion.capitalize())
        ticks(ax, k == 0)
    axes[0][0].set_ylabel(ylabel)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="selected neurons")
    fig.suptitle(title, y=1.02)
    out = _save(fig, path)
    plt.close(fig)
    return out


@figure
def seen_unseen_bars(
    groups: dict[str, dict[str, float | None]],
    cis: dict[str, dict[str, list[float] | None]],
    emotions: Sequence[str],
    path: Path,
    *,
    title: str,
) -> Path:
    """Figure 10 style: Delta self-effect per target emotion, one bar per split, 95% CI whiskers."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.3 * len(emotions) + 2, 3.0))
    width = 0.8 / max(len(groups), 1)
    x = np.arange(len(emotions))
    for k, (split, values) in enumerate(groups.items()):
        v = np.array([np.nan if values.get(e) is None else values[e] for e in emotions], dtype=float)
        lo, hi = [], []
        for e, val in zip(emotions, v, strict=True):
            ci = (cis.get(split) or {}).get(e)
            lo.append(0 if ci is None or not np.isfinite(val) else val - ci[0])
            hi.append(0 if ci is None or not np.isfinite(val) else ci[1] - val)
        ax.bar(x + (k - (len(groups) - 1) / 2) * width, np.nan_to_num(v), width, yerr=[lo, hi], capsize=3,
               label=split.replace("_", "-"))
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, [e.capitalize() for e in emotions])
    ax.set_ylabel("Δ emotion match (pp)")
    ax.set_title(title)
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the axes: never over a bar
    out = _save(fig, path)
    plt.close(fig)
    return out


@figure
def win_tie_loss(rates: dict[str, dict[str, float]], path: Path, *, title: str) -> Path:
    """Figure 8 style: stacked horizontal win / tie / loss shares per emotion (intervened vs baseline)."""
    plt = _plt()
    names = list(rates)
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1.2))
    left = np.zeros(len(names))
    for part, colour in (("win", "#2b8cbe"), ("tie", "#bdbdbd"), ("loss", "#e34a33")):
        vals = np.array([100 * rates[n].get(part, 0.0) for n in names])
        ax.barh(names, vals, left=left, color=colour, label=part)
        for i, (l0, v) in enumerate(zip(left, vals, strict=True)):
            if v >= 6:
                ax.text(l0 + v / 2, i, f"{v:.0f}%", ha="center", va="center", fontsize=8)
        left += vals
    ax.set_xlim(0, 100)
    ax.set_xlabel("share of judgements (%)")
    ax.legend(ncol=3, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    ax.set_title(title)
    out = _save(fig, path)
    plt.close(fig)
    return out


# -- the views of esn.pipeline.report_views: trade-off curves and depth profiles ---------------------------
@figure
def effect_curves(panels: Sequence[dict], path: Path, *, title: str) -> Path:
    """One panel per swept factor: self and cross effect (pp, left axis) and WER (%, right axis, the
    baseline dotted) against the factor. Each panel: ``{"x", "xlabel", "log", "self", "cross", "wer",
    "wer_baseline"}``, the lists in ``x`` order (None: not measured)."""
    plt = _plt()
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 0.6, 3.0), squeeze=False)
    arr = lambda vs: np.array([np.nan if v is None else v for v in vs], dtype=float)  # noqa: E731
    twins = []
    for k, (ax, p) in enumerate(zip(axes[0], panels, strict=True)):
        x = np.array(p["x"], dtype=float)
        ax.plot(x, arr(p["self"]), "o-", color="#1b7837", label="self-effect")
        ax.plot(x, arr(p["cross"]), "s--", color="#762a83", label="cross-effect")
        ax.axhline(0, color="black", linewidth=0.6)
        if p.get("log"):
            ax.set_xscale("log")
            ax.set_xticks(x, [f"{v:g}" for v in x])  # the swept values, not decades
            ax.minorticks_off()
        ax.set_xlabel(p["xlabel"])
        if k == 0:
            ax.set_ylabel("Δ emotion match (pp)")
        wer_ax = ax.twinx()
        twins.append(wer_ax)
        wer_ax.plot(x, arr(p["wer"]), "^-", color="#d95f02", alpha=0.8, label="WER (steered)")
        if p.get("wer_baseline") is not None:
            wer_ax.axhline(p["wer_baseline"], color="#d95f02", linestyle=":", linewidth=1, label="WER (baseline)")
        wer_ax.set_ylim(bottom=0)
        if k == n - 1:
            wer_ax.set_ylabel("WER (%)", color="#d95f02")
    (h1, l1), (h2, l2) = axes[0][0].get_legend_handles_labels(), twins[0].get_legend_handles_labels()
    handles, labels = h1 + h2, l1 + l2
    fig.legend(handles, labels, loc="lower center", ncol=4, frameon=False, bbox_to_anchor=(0.5, -0.08))
    fig.suptitle(title, y=1.02)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


@figure
def depth_profiles(profiles: dict[str, tuple[Sequence[str], np.ndarray]], path: Path, *, title: str) -> Path:
    """One panel per stream: the share (%) of each layer's neurons selected, one line per emotion, against
    relative depth (0: first layer, 1: last) so that streams of different depth line up.
    ``profiles``: ``{stream: (emotions, share [E, L])}``."""
    plt = _plt()
    n = len(profiles)
    fig, axes = plt.subplots(1, n, figsize=(3.8 * n + 1.6, 2.8), squeeze=False, sharey=True)
    for ax, (stream, (emotions, share)) in zip(axes[0], profiles.items(), strict=True):
        share = np.asarray(share, dtype=float)
        depth = np.linspace(0, 1, share.shape[1]) if share.shape[1] > 1 else np.zeros(1)
        for emotion, row in zip(emotions, share, strict=True):
            ax.plot(depth, row, "o-", markersize=3, label=emotion.capitalize())
        ax.set_title(f"{stream} ({share.shape[1]} layers)")
        ax.set_xlabel("relative depth")
        ax.set_xlim(-0.03, 1.03)
    axes[0][0].set_ylabel("selected (% of the layer)")
    axes[0][-1].legend(frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title, y=1.03)
    out = _save(fig, path)
    plt.close(fig)
    return out


@figure
def layer_depth_lines(lines: Sequence[tuple[str, Sequence[float], Sequence[float]]], path: Path, *,
                      title: str) -> Path:
    """Figure 9 across models: one line per (model, stream), the share of its selected neurons per layer
    against relative layer depth (0 the first layer, 1 the last), so decoders of different depths line up."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for name, depth, share in lines:
        ax.plot(depth, 100 * np.asarray(share, dtype=float), marker="o", markersize=3, label=name)
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("relative layer depth (layer / (layers − 1))")
    ax.set_ylabel("share of selected neurons (%)")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    out = _save(fig, path)
    plt.close(fig)
    return out
