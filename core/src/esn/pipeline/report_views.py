"""The report's views for people reading it rather than citing it: a sample of baseline vs steered clips
to listen to, the effect / WER trade-off against α, the curves over r and c, and where the selected
neurons sit along each stream's depth. Each view is a function returning report blocks (empty when the
run holds nothing to show), called from :func:`esn.pipeline.report.build`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from esn.errors import EsnError
from esn.pipeline import plots
from esn.pipeline.config import Setting
from esn.pipeline.grid import BASELINE
from esn.pipeline.run import Run


def display_source(source: str | Path, run_dir: Path) -> str:
    """A checkpoint as a report names it: a hub id as written; a local folder relative to the run directory
    when inside it, else by its folder name (a report is shared: it never carries this machine's paths)."""
    text = str(source)
    path = Path(text).expanduser()
    if not path.is_absolute() and not path.exists():
        return text  # a hub id (or a relative name): as the config gives it
    try:
        return path.resolve().relative_to(Path(run_dir).resolve()).as_posix() or "."
    except ValueError:
        return f"…/{path.name}" if path.name else text


def intervention_title(method: str, alpha: float) -> str:
    """A panel title that says what the intervention does: ``steer ×2 (α = 1)``, ``deactivate (g = 0)``."""
    from esn.interventions import resolve

    try:
        cls, alpha = resolve(method, alpha)
    except EsnError:  # an intervention this process cannot load: its name and strength
        return f"{method} (α = {alpha:g})"
    form = cls.affine(alpha)
    if form is None:
        return f"{method} (α = {alpha:g})"
    if form.scale == 0.0 and form.shift == 0.0:
        return f"{method} (g = 0)"
    if form.floor != -np.inf:
        return f"{method}: g ≥ {alpha:g}"
    if form.shift != 0.0:
        return f"{method}: g {'+' if alpha >= 0 else '−'} {abs(alpha):g}"
    return f"{method} ×{form.scale:g} (α = {alpha:g})"


# -- listening: a sample of baseline vs steered clips -----------------------------------------------------
def listening_blocks(run: Run, anchor: Setting, targets: list[str], *, per_target: int = 2) -> list:
    """Per target emotion, ``per_target`` sources (seeded by the run's seed) with the baseline clip and the
    anchor's self-steered clip (its mask emotion = the target), as players linking the run's saved wavs."""
    from esn.pipeline import evaluate
    from esn.pipeline.batches import derive_seed
    from esn.pipeline.blocks import Block

    try:
        records = evaluate.records(run)
    except EsnError:  # the grid is incomplete: the report's tables say so already
        return []
    base = {(r["split"], r["source"], r["target"]): r for r in records if r["setting"] == BASELINE and r.get("audio")}
    rng = np.random.default_rng(derive_seed(run.cfg.seed, "report-clips"))
    rows = []
    for target in targets:
        pairs = [(base[k], r) for r in records
                 if r["setting"] == anchor.key and r["mask"] == r["target"] == target and r.get("audio")
                 and (k := (r["split"], r["source"], r["target"])) in base]
        pairs = [(b, s) for b, s in pairs if (run.rundir.evaluate / b["audio"]).is_file()
                 and (run.rundir.evaluate / s["audio"]).is_file()]
        pick = sorted(rng.choice(len(pairs), size=min(per_target, len(pairs)), replace=False)) if pairs else []
        for k in pick:
            b, s = pairs[k]
            rel = lambda r: (run.rundir.evaluate / r["audio"]).relative_to(run.dir).as_posix()  # noqa: E731
            rows.append([target.capitalize(), f"{b['source']} ({b['split'].replace('_', '-')})",
                         {"audio": rel(b), "name": "baseline", "label": _verdict(b, target)},
                         {"audio": rel(s), "name": "steered", "label": _verdict(s, target)}])
    if not rows:
        return []
    return [Block("h2", "Listen: baseline vs steered"),
            Block("p", f"A seeded sample of {per_target} source utterances per target emotion: the unsteered "
                       f"conversion and the anchor's ({anchor.label}, {intervention_title(anchor.method, anchor.alpha)}) "
                       "conversion with the target's own mask. Under each clip: what the first judge heard. The "
                       "files are the run's own evaluate/audio/ clips (set evaluate.save_audio = true to keep them)."),
            Block("clips", {"head": ["target", "source", "baseline", "steered"], "rows": rows})]


def _verdict(record: dict, target: str) -> str:
    label = next(iter((record.get("labels") or {}).values()), None)  # the first judge's (config order)
    return "judge: no label" if label is None else f"judge: {label}" + (" ✓" if label == target else "")


# -- curves: the trade-off against α, and the sweeps over r and c -----------------------------------------
def curve_blocks(run: Run, sw: dict, groups: dict, primary: str, anchor: Setting) -> list:
    """Self and cross effect (judge ``primary``) and WER against each swept factor (α, r, c)."""
    from esn.pipeline.blocks import Block

    panels = []
    for key, name, value in (("alpha", "α", lambda s: s.alpha), ("rate", "selection rate r", lambda s: s.rate),
                             ("c", "success-set cap c", lambda s: s.c)):
        rows = sw.get(key) or []
        if len(rows) < 2:
            continue
        ms = [groups[st.key] for st in rows]
        panel = {"x": [float(value(st)) for st in rows], "xlabel": name, "log": key == "rate",
                 "self": [m["judges"][primary].get("self") for m in ms],
                 "cross": [m["judges"][primary].get("cross") for m in ms],
                 "wer": [m.get("wer") for m in ms], "wer_baseline": ms[0].get("wer_baseline")}
        if key == "alpha" and 0.0 not in panel["x"] and _identity_at_zero(anchor.method):
            panel = {**panel, "x": [0.0, *panel["x"]], "self": [0.0, *panel["self"]],  # α = 0 is the baseline
                     "cross": [0.0, *panel["cross"]], "wer": [panel["wer_baseline"], *panel["wer"]]}
        panels.append(panel)
    if not panels:
        return []
    png = plots.effect_curves(panels, run.rundir.figures / "curves.png",
                              title=f"{anchor.label}, {anchor.method}: effect (judge {primary}) and WER")
    return [Block("h2", "Trade-off curves — effect and WER against α, r and c"),
            Block("p", "Each panel changes one factor of the anchor and keeps the others. Left axis: Δ emotion "
                       "match vs baseline (pp), self-effect (mask emotion = target) and cross-effect (the other "
                       "targets); right axis: WER (%) of the steered conversions, dotted line the baseline's. A "
                       "good setting raises the self-effect, keeps the cross-effect near 0 and WER near the "
                       "baseline."),
            Block("img", ("effect and WER against the swept factors", png.relative_to(run.dir)))]


def _identity_at_zero(method: str) -> bool:
    """Whether ``method`` at α = 0 leaves the gate as it is (steer, add): then α = 0 is the baseline."""
    from esn.interventions import Affine, resolve

    try:
        cls, _ = resolve(method, 0.0)
    except EsnError:
        return False
    return cls.needs_alpha and cls.affine(0.0) == Affine()


# -- where the selected neurons sit along each stream --------------------------------------------------------
def depth_blocks(run: Run, sw: dict, anchor: Setting) -> list:
    """Share of each layer's neurons selected, per emotion, for the anchor's selector on every stream that
    has a mask of it (lm vs synth side by side, depth on a common axis)."""
    from esn import artifacts
    from esn.analysis import layer_counts
    from esn.pipeline.blocks import Block

    profiles = {}
    for stream, rows in sw["selectors"].items():
        st = next((s for s in rows if s.selector == anchor.selector and s.labels == anchor.labels), None)
        path = None if st is None else run.rundir.select / f"masks_{st.mask_key}.safetensors"
        if path is None or not path.exists():
            continue
        loaded = artifacts.load_masks(path)
        counts = layer_counts(loaded.masks, loaded.layout)[stream]  # [E, L]
        widths = np.zeros(counts.shape[1])
        for hp in loaded.layout.hook_points:
            if hp.stream == stream:
                widths[hp.layer] += hp.width
        share = 100 * counts / np.where(widths > 0, widths, np.nan)
        profiles[stream] = (list(loaded.masks), share)
    if not profiles:
        return []
    png = plots.depth_profiles(profiles, run.rundir.figures / "depth.png",
                               title=f"{anchor.label} ESNs along the depth of each stream (r = {anchor.rate:g})")
    both = len(profiles) > 1
    return [Block("h2", "Where the selected neurons sit" + (" — lm vs synth" if both else "")),
            Block("p", "Share of each decoder layer's gate neurons in the mask (%), per emotion, along the stream's "
                       "depth (0: first layer, 1: last)" + (", the language-model stream beside the speech-token "
                       "stream." if both else f"; only {next(iter(profiles))} has a {anchor.label} mask in this run.")),
            Block("img", ("selected neurons along each stream's depth", png.relative_to(run.dir)))]
