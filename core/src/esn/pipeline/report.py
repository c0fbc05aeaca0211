"""report.md and report.html: the paper's Tables 2-5 and Figures 3, 8, 9, 10 for one run directory.

The report is built as a list of blocks (heading, text, table, image) and rendered twice, as Markdown
and as a self-contained HTML page that links the same PNGs.
"""

from __future__ import annotations

import html
import re
import warnings
from pathlib import Path
from urllib.parse import quote

import numpy as np

from esn.emotions import EMOTIONS
from esn.pipeline import evaluate, human, plots, record, report_views
from esn.pipeline.blocks import Block
from esn.pipeline.config import Setting, settings
from esn.pipeline.files import atomic_write_json, atomic_write_text, read_json, read_sealed
from esn.pipeline.grid import BASELINE
from esn.pipeline.run import Run

_RESELECT = "run `esn select` to write it again"  # what to do about a damaged select output


def _f(v: float | None, fmt: str = "+.2f") -> str:
    return "–" if v is None else format(v, fmt)


def _pair(entries: list[dict], key: str) -> str:
    return " / ".join(_f(e.get(key)) for e in entries)


def _with_delta(v: float | None, base: float | None, fmt: str = ".2f") -> str:
    if v is None:
        return "–"
    return f"{v:{fmt}} ({_f(None if base is None else v - base, '+' + fmt)})"


STREAM_TITLE = {"lm": "language-model stream (lm)", "synth": "synthesis stream (synth)"}
SETTING_FIELDS = ("selector", "rate", "c", "labels", "method", "alpha", "stream", "positions", "quantile")


def effect_table(rows: list[tuple[str, dict]], judges: list[str], primary: str,
                 single: set[str] = frozenset()) -> dict:
    """Tables 3/4/6 shape: self, cross, gap per judge ("a / b"), WER over all and over self cells (Delta),
    UTMOS (Delta), self CI. Rows named in ``single`` (Random) get the paper's one figure instead: the mean
    Delta over all mask x target cells, in the self column."""
    head = ["", "Self-Effect ↑", "Cross-Effect Avg. ↓", "Self–Cross Gap ↑", "WER % all ↓ (Δ)", "WER % self ↓ (Δ)",
            "UTMOS ↑ (Δ)", f"Self 95% CI ({primary})"]
    body = []
    for name, m in rows:
        if m.get("no_success"):  # emotions whose masks were not selected: left out of this row's figures
            name = f"{name} ({', '.join(m['no_success'])}: no success set)"
        entries = [m["judges"][j] for j in judges]
        wer = _with_delta(m["wer"], m["wer_baseline"])
        wer_self = _with_delta(m.get("wer_self"), m["wer_baseline"])
        q = _with_delta(m["quality"], m["quality_baseline"])
        if name in single:
            ci = m["judges"][primary].get("ci", {}).get("all")
            body.append([name, f"{_pair(entries, 'all')} (all cells)", "", "", wer, wer_self, q,
                         "–" if ci is None else f"all: [{ci[0]:+.2f}, {ci[1]:+.2f}]"])
            continue
        ci = m["judges"][primary].get("ci", {}).get("self")
        body.append([name, _pair(entries, "self"), _pair(entries, "cross"), _pair(entries, "gap"), wer, wer_self, q,
                     "–" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"])
    return {"head": head, "rows": body}


def no_success_name(t: str, no_success=()) -> str:
    """A target emotion as a table row names it, marked when it had no success set (nothing selected)."""
    return t.capitalize() + (" (no success set)" if t in no_success else "")


def baseline_table(m: dict, targets: list[str], judges: list[str], no_success=()) -> dict:
    """Table 2 shape: baseline match % per target emotion and judge, average, WER, UTMOS."""
    rows = [[no_success_name(t, no_success), " / ".join(_f(m["judges"][j]["baseline"][t], ".2f") for j in judges)]
            for t in targets]
    rows.append(["Avg.", " / ".join(_f(m["judges"][j]["baseline"]["avg"], ".2f") for j in judges)])
    rows.append(["WER %", _f(m["wer_baseline"], ".2f")])
    rows.append(["UTMOS", _f(m["quality_baseline"], ".2f")])
    return {"head": ["", f"match % ({' / '.join(judges)})"], "rows": rows}


def predicted_table(m: dict, targets: list[str], judge: str) -> dict:
    """The baseline's predicted-label distribution per target emotion, % of clips (section 5.1)."""
    dist = m["judges"][judge].get("predicted", {})
    labels = sorted({lab for t in targets for lab in dist.get(t, {})},
                    key=lambda x: (x == "none", x not in EMOTIONS, EMOTIONS.index(x) if x in EMOTIONS else 0, x))
    rows = [[t.capitalize(), *[_f(dist.get(t, {}).get(lab, 0.0), ".1f") for lab in labels]] for t in targets]
    return {"head": ["target → predicted", *[("no label" if lab == "none" else lab) for lab in labels]], "rows": rows}


def sweeps(sts: list[Setting]) -> dict:
    """The one-factor-at-a-time groups around the anchor ``sts[0]``; ``"selectors"`` per stream."""
    a = sts[0]
    same = lambda st, *skip: all(getattr(st, f) == getattr(a, f) for f in SETTING_FIELDS if f not in skip)  # noqa: E731
    streams = list(dict.fromkeys(st.stream for st in sts))
    return {
        "selectors": {s: [st for st in sts if st.stream == s and same(st, "selector", "labels", "stream")]
                      for s in streams},
        "alpha": sorted([st for st in sts if same(st, "alpha")], key=lambda s: s.alpha),
        "rate": sorted([st for st in sts if same(st, "rate")], key=lambda s: s.rate),
        "c": sorted([st for st in sts if same(st, "c")], key=lambda s: s.c),
        "method": [a] + [st for st in sts if same(st, "method", "alpha") and st.method != a.method],
        "positions": sorted([st for st in sts if same(st, "positions")], key=lambda s: s.positions),
        "lape_quantile": sorted([st for st in sts if st.selector == "lape" and st.quantile is not None
                                 and same(st, "selector", "quantile")], key=lambda s: s.quantile),
    }


def selector_title(stream: str) -> str:
    """Table 3 on the language-model stream, Table 6 on the synthesis stream (the paper's numbering)."""
    if stream == "synth":
        return "Table 6 — selectors on the synthesis stream (synth)"
    return f"Table 3 — selectors on the {STREAM_TITLE.get(stream, stream)}"


def _layer_counts(masks, layout) -> tuple[np.ndarray, list[str]]:
    """ESNs per layer (rows, stream by stream) and emotion (columns), from ``esn.analysis``."""
    from esn.analysis import layer_counts

    tables = layer_counts(masks, layout)  # {stream: [E, L]}
    names = [f"{stream} {layer}" for stream, t in tables.items() for layer in range(t.shape[1])]
    return np.concatenate([t.T for t in tables.values()], axis=0), names


def _protocol(run: Run, groups: dict, main: str, judges: list[str]) -> list[Block]:
    """What produced the numbers: prompts, positions, filter, judges, WER definition, unscored clips."""
    cfg = run.cfg
    g = cfg.generation
    used = record.prompts(run) or {"system_prompt": g.system_prompt, "instruction": g.instruction}
    system = used.get("system_prompt")
    instructed, text_out = used.get("instruction_channel", True), used.get("text_out", True)
    rows = [
        ["model", f"`{cfg.model.adapter}` from `{report_views.display_source(cfg.model.source, run.dir)}`, "
                  f"streams recorded: {', '.join(cfg.model.streams)}"],
        *([["system prompt", "the adapter's default" if system is None else f"“{system}”"],
           ["instruction", f"“{used.get('instruction')}” ({{emotion}}: the target)"]] if instructed else
          [["instruction", "nothing was sent: the model has no instruction channel (each attempt's target emotion "
                           "is recorded with it, never given to the model)"]]),
        *([["words", "the model speaks the given words: each source's transcript is its input (and the WER "
                     "reference)"]] if used.get("speaks_given_words") else []),
        ["decoding", f"greedy; at most {g.max_new_tokens} text and {g.max_audio_tokens} speech tokens"],
        ["P counts", "every position (prompt and generated)" if cfg.record.positions == "all"
         else "generated positions only (the prompt's are stored but not counted)"],
        ["interventions edit", "every forward (the prompt and each generated step)" if cfg.evaluate.positions == "all"
         else "generated steps only (the prompt's forward is untouched)"],
        ["success filter", f"judge `{run.filter_judge}` "
         f"{'says the target emotion' if cfg.filter.require_match else '(emotion not required)'} and "
         + (f"WER ≤ {cfg.filter.tau_wer:g}" if text_out else
            "no content check: the model writes no text and no ASR is configured, so the filter is the judge "
            "alone (WER not checked)")
         + "; each emotion's set capped at c (seeded uniform sample)"],
        ["selector options", "; ".join(f"{k}: {', '.join(f'{o} = {v}' for o, v in opts.items())}"
                                       for k, opts in cfg.selectors.items()) or "defaults (docs/selection.md)"],
        ["WER", ("corpus WER (%) of the decoded text against the transcript after whisper normalisation; "
                 "“all” pools every mask × target cell of a setting, “self” the cells whose mask emotion is the "
                 "target; Δ against the baseline over the same sources and targets") if text_out else
                ("not a measure of the speech: the model writes no text, so its “decoded text” is not its "
                 "output and WER says nothing about the words spoken")],
    ]
    every = list(groups[main].values())
    if all("n" in m for m in every):  # results.json of an older esn lacks the counts
        n = sum(m["n"] for m in every)
        unl = [f"`{j}` left {sum(m['judges'][j]['unlabelled'] for m in every)} of {n} clips unlabelled "
               "(counted as misses)" for j in judges]
        quality = cfg.judges.quality
        q = ("no naturalness judge configured" if quality is None else
             f"`{quality.name}` could not score {sum(m['quality_unscored'] for m in every)} of {n} clips "
             "(left out of its mean)")
        rows.append(["unscored clips", "; ".join([*unl, q])
                     + f" — {main.replace('_', '-')}, every setting and the baseline"])
    return [Block("h2", "Protocol"), Block("table", {"head": ["", ""], "rows": rows})]


def build(run: Run) -> list[Block]:
    """The report of a finished run as blocks: settings, effect tables, figures, caveats."""
    cfg = run.cfg
    res = evaluate.results(run.rundir.evaluate / "results.json")
    meta, groups = res["meta"], res["groups"]
    targets, judges, splits = meta["targets"], meta["judges"], meta["splits"]
    primary = judges[0]
    main = "all" if "all" in groups else splits[0]
    sts = settings(cfg)
    anchor = sts[0]
    fig_dir = run.rundir.figures
    blocks: list[Block] = [Block("h1", "esn run report")]
    if cfg.notes:
        blocks.append(Block("p", cfg.notes))
    n_rec = len(record.store(run).records()) if (run.rundir.record / "layout.json").exists() else 0
    sizes = ", ".join(f"{s}: {groups[s][BASELINE]['n_sources']} sources" for s in splits)
    blocks.append(Block("p", (
        f"Model `{cfg.model.adapter}` from `{report_views.display_source(cfg.model.source, run.dir)}`, streams {', '.join(cfg.model.streams)}; "
        f"{n_rec} recorded identification attempts; evaluation on {', '.join(splits)} "
        f"({sizes}); judges {', '.join(judges)}"
        f"{'' if cfg.judges.quality is None else f', naturalness {cfg.judges.quality.name}'}. "
        f"Anchor: {anchor.label} on {anchor.stream}, r = {anchor.rate:g}, c = {anchor.c}, {anchor.method} "
        f"α = {anchor.alpha:g}. "
        f"Match values are % of converted utterances whose judged emotion is the target; Δ are percentage points "
        f"against the unintervened baseline; tables pool {main.replace('_', '-')} "
        f"({cfg.evaluate.bootstrap} bootstrap resamples of source utterances for CIs).")))
    blocks += _protocol(run, groups, main, judges)

    summary_path = run.rundir.select / "summary.json"
    if summary_path.exists():
        sets = read_sealed(summary_path, _RESELECT)["success_sets"]
        rows = [[key.replace("_ser", " (judge)").replace("_human", " (human, CAS-H)"),
                 *[str(len(v.get(t, []))) if v.get(t) else "0 (no success set)" for t in targets]]
                for key, v in sets.items()]
        blocks += [Block("h2", "Success sets"),
                   Block("p", f"Successful identification attempts kept per target emotion (judge `{judges[0]}` "
                              f"{'says the target and ' if cfg.filter.require_match else '(emotion not required) and '}"
                              f"WER ≤ τ = {cfg.filter.tau_wer:g}, capped at c, seeded). Human (CAS-H) sets use "
                              "listeners' labels in place of the judge's, on clips drawn from WER-passing attempts; "
                              "compare their sizes before reading CAS vs CAS-H as a difference of supervision."),
                   Block("table", {"head": ["set", *[t.capitalize() for t in targets]], "rows": rows})]

        summary = read_sealed(summary_path, _RESELECT)
        small = _small_masks(run, summary["masks"], sts, summary.get("no_success", {}))
        if small:
            blocks += [Block("p", "Masks with fewer neurons than floor(r·N) (CAS and LAPE keep only neurons that "
                                  "qualify; an empty mask leaves its cells unsteered, so they measure noise):"),
                       Block("table", {"head": ["mask", "emotion", "neurons", "floor(r·N)"], "rows": small})]

    unselected = groups[main][anchor.key].get("no_success", [])
    blocks += [Block("h2", "Table 2 — baseline (no intervention)"),
               Block("table", baseline_table(groups[main][BASELINE], targets, judges, unselected)),
               Block("h3", f"Predicted labels of the baseline (judge {primary}, % of clips per target)"),
               Block("table", predicted_table(groups[main][BASELINE], targets, primary))]

    sw = sweeps(sts)
    g = groups[main]
    random_rows = {st.label for st in sts if st.selector == "random"}
    for stream, rows in sw["selectors"].items():
        blocks += [Block("h2", selector_title(stream)),
                   Block("p", f"Δ emotion match vs baseline ({' / '.join(judges)}), masks selected and applied on "
                              f"{stream}, at r = {anchor.rate:g}, c = {anchor.c}, {anchor.method} α = {anchor.alpha:g}. "
                              "Random masks are not emotion-specific, so their row gives one figure, the mean Δ over "
                              "all mask × target cells, as in the paper."),
                   Block("table", effect_table([(st.label, g[st.key]) for st in rows], judges, primary, random_rows))]
    if len(sw["alpha"]) > 1:
        blocks += [Block("h2", f"Table 4 — intervention strength ({anchor.label}, {anchor.method})"),
                   Block("table", effect_table([(f"α = {st.alpha:g}", g[st.key]) for st in sw["alpha"]], judges, primary))]
    for key, title, fmt in (("rate", "selection rate r", lambda s: f"r = {s.rate:g}"),
                            ("c", "success-set cap c", lambda s: f"c = {s.c}"),
                            ("method", "intervention method", lambda s: report_views.intervention_title(s.method, s.alpha)),
                            ("positions", "positions counted in P", lambda s: f"P over {s.positions} positions")):
        if len(sw[key]) > 1:
            blocks += [Block("h3", f"Sweep: {title} ({anchor.label})"),
                       Block("table", effect_table([(fmt(st), g[st.key]) for st in sw[key]], judges, primary))]
    blocks += _lape_quantile_blocks(run, sw["lape_quantile"], g, judges, primary)
    blocks += _positions_blocks(run, targets)
    blocks += report_views.curve_blocks(run, sw, g, primary, anchor)

    # Figure 3 (and the sweeps as heatmap rows, like Figures 4-7)
    blocks.append(Block("h2", "Figure 3 — Δ match per mask emotion × target emotion"))
    figures = [(f"selectors{'' if s == anchor.stream else '_' + s}", f"selectors ({s})", lambda st: st.label, rows)
               for s, rows in sw["selectors"].items()]
    figures += [(key, title, name, sw[key]) for key, title, name in (
        ("rate", "selection rate", lambda s: f"r={s.rate:g}"), ("c", "success-set cap", lambda s: f"c={s.c}"),
        ("alpha", "strength", lambda s: f"α = {s.alpha:g}"),
        ("method", "method", lambda s: report_views.intervention_title(s.method, s.alpha)),
        ("positions", "positions in P", lambda s: f"P: {s.positions}")) if len(sw[key]) > 1]
    for key, title, name, rows in figures:
        panels = [(name(st), g[st.key]["judges"][primary]["matrix"]) for st in rows]
        png = plots.delta_heatmaps(panels, targets, fig_dir / f"heatmap_{key}.png",
                                   title=f"Δ match (pp), judge {primary}, {main.replace('_', '-')}: {title}")
        blocks.append(Block("img", (f"Δ match heatmaps: {title}", png.relative_to(run.dir))))

    # Figure 9: where the anchor mask's neurons are
    from esn import artifacts

    mask_path = run.rundir.select / f"masks_{anchor.mask_key}.safetensors"
    if mask_path.exists():
        loaded = artifacts.load_masks(mask_path)
        counts, names = _layer_counts(loaded.masks, loaded.layout)
        png = plots.layer_heatmap(counts, names, list(loaded.masks), fig_dir / "layers.png",
                                  title=f"{anchor.label} ESNs per layer (r = {anchor.rate:g})")
        blocks += [Block("h2", "Figure 9 — layer distribution of the anchor mask"),
                   Block("img", ("ESNs per layer and emotion", png.relative_to(run.dir)))]
        if loaded.layout.routed:
            blocks += _expert_blocks(run, anchor, loaded, fig_dir)
        blocks += _index_blocks(run, anchor, loaded, fig_dir)
    blocks += report_views.depth_blocks(run, sw, anchor)

    # Figure 10: seen vs unseen
    if len(splits) > 1:
        vals = {s: groups[s][anchor.key]["judges"][primary]["self_per_target"] for s in splits}
        cis = {s: groups[s][anchor.key]["judges"][primary].get("ci", {}).get("self_per_target", {}) for s in splits}
        png = plots.seen_unseen_bars(vals, cis, targets, fig_dir / "seen_unseen.png",
                                     title=f"Self-effect per emotion, {anchor.label} (judge {primary}, 95% CI)")
        rows = [[s.replace("_", "-"), *["no success set" if t in unselected else _f(vals[s].get(t)) for t in targets]]
                for s in splits]
        blocks += [Block("h2", "Figure 10 — seen vs unseen speakers"),
                   Block("img", ("seen vs unseen", png.relative_to(run.dir))),
                   Block("table", {"head": ["split", *[t.capitalize() for t in targets]], "rows": rows})]

    blocks += report_views.listening_blocks(run, anchor, targets)
    blocks += _human_blocks(run, targets)
    blocks += _judge_eval_blocks(run)
    return blocks


def _small_masks(run: Run, sizes: dict[str, dict[str, int]], sts: list[Setting],
                 no_success: dict[str, list[str]] | None = None) -> list[list[str]]:
    """``[mask, emotion, size, floor(r N)]`` for every mask of the grid smaller than its selection rate asks."""
    from esn.selection import n_selected

    widths = {}
    layout_path = run.rundir.record / "layout.json"
    if layout_path.exists():
        for hp in read_json(layout_path)["hook_points"]:
            stream = hp["name"].split(".")[0]
            widths[stream] = widths.get(stream, 0) + int(hp["width"])
    rows = []
    for st in dict.fromkeys(st.recipe for st in sts):
        if st.key not in sizes or st.stream not in widths:
            continue
        want = n_selected(st.rate, widths[st.stream])
        none = (no_success or {}).get(st.key, [])
        rows += [[st.key, f"{e} (no success set)" if e in none else e, str(n), str(want)]
                 for e, n in sizes[st.key].items() if n < want]
    return rows


def _lape_quantile_blocks(run: Run, rows: list[Setting], g: dict, judges: list[str], primary: str) -> list[Block]:
    """``sweep.lape_quantiles``: LAPE at each global percentile tau_p of P (the paper leaves it open), with the
    neurons each mask kept (LAPE keeps only neurons above tau_p for some emotion)."""
    if not rows:
        return []
    path = run.rundir.select / "summary.json"
    summary = read_sealed(path, _RESELECT) if path.exists() else {}
    sizes, none = summary.get("masks", {}), summary.get("no_success", {})

    def name(st: Setting) -> str:
        n = [v for e, v in sizes.get(st.mask_key, {}).items() if e not in none.get(st.mask_key, [])]
        return f"q = {st.quantile:g} ({np.mean(n):.1f} neurons per mask)" if n else f"q = {st.quantile:g}"

    a = rows[0]
    return [Block("h3", "Sweep: LAPE percentile"),
            Block("p", f"LAPE with its probability threshold τ_p at each global percentile q of P (over every "
                       f"emotion and neuron of the {a.stream} stream), at r = {a.rate:g}, c = {a.c}, {a.method} "
                       f"α = {a.alpha:g}. The paper fixes neither q nor τ_p; a high q can leave LAPE few or no "
                       "neurons (an empty mask leaves its cells unsteered). See docs/paper.md."),
            Block("table", effect_table([(name(st), g[st.key]) for st in rows], judges, primary))]


def _positions_blocks(run: Run, targets: list[str]) -> list[Block]:
    """How much of each stream's P is prompt, and how far the anchor masks move without it."""
    path = run.rundir.select / "positions.json"
    if not path.exists():
        return []
    data = read_sealed(path, _RESELECT)
    rows = []
    for stream, entry in data["streams"].items():
        for t in targets:
            share = entry["prompt_share"].get(t)
            ov = entry.get("overlap", {}).get(t)
            if t not in entry["prompt_share"]:
                rows.append([stream, no_success_name(t, [t]), "–", "–", "–"])
                continue
            rows.append([stream, t.capitalize(), "–" if share is None else f"{100 * share:.1f}%",
                         "–" if ov is None else f"{ov['jaccard']:.3f}", "–" if ov is None else f"{100 * ov['direct_match']:.1f}%"])
    out = [Block("h3", "Ablation: positions counted in P (prompt vs generated)"),
           Block("p", f"Each attempt's counts are stored for the prompt and the generated positions apart. Prompt "
                      f"share: the prompt's part of the positions T of each emotion's success set. Overlap: the "
                      f"anchor recipe ({data['anchor']}) selected from P over all positions vs over generated "
                      "positions only (Jaccard, and the share of the all-positions mask kept). Run "
                      "`esn select --positions generated` (or sweep.positions) to evaluate the other reading.")]
    errors = [f"{s}: {e['error']}" for s, e in data["streams"].items() if "error" in e]
    if errors:
        out.append(Block("p", "Not computed for " + "; ".join(errors)))
    out.append(Block("table", {"head": ["stream", "emotion", "prompt share", "Jaccard", "direct match"], "rows": rows}))
    return out


def _judge_eval_blocks(run: Run) -> list[Block]:
    """Section 4.1: each emotion judge's accuracy on labelled clips (``esn judge-eval``)."""
    path = run.dir / "judge_eval.json"
    if not path.exists():
        return []
    data = read_sealed(path, "run `esn judge-eval` to write it again")
    emotions = data["emotions"]
    rows = [[name, f"{100 * r['accuracy']:.1f}%", str(r["n"]),
             *[_f(None if r["per_emotion"].get(e) is None else 100 * r["per_emotion"][e], ".1f") for e in emotions]]
            for name, r in data["judges"].items()]
    return [Block("h2", "Judge accuracy on labelled clips (section 4.1)"),
            Block("p", f"{data['per_emotion']} clips per emotion from split `{data['split']}` of "
                       f"`{report_views.display_source(data['root'], run.dir)}` "
                       f"(seed {data['seed']}); each judge hears the clip with its parallel neutral utterance as "
                       "the source. Per-emotion columns: % of that emotion's clips labelled correctly."),
            Block("table", {"head": ["judge", "accuracy", "clips", *[e.capitalize() for e in emotions]], "rows": rows})]


def _expert_blocks(run: Run, anchor, loaded, fig_dir: Path) -> list[Block]:
    """Mixture-of-experts models: where the anchor mask's neurons sit by layer and expert, and how each
    emotion's successful attempts were routed (esn.routing, esn.analysis.routing_table)."""
    from esn import analysis, artifacts

    names, counts = analysis.expert_counts(loaded.masks, loaded.layout)
    png = plots.expert_heatmap(counts, names, list(loaded.masks), fig_dir / "layers_experts.png",
                               title=f"{anchor.label} ESNs per routed layer and expert (r = {anchor.rate:g})")
    blocks = [Block("h3", "Layer × expert view (mixture-of-experts layers)"),
              Block("img", ("ESNs per routed layer and expert", png.relative_to(run.dir)))]
    stats_path = run.rundir.select / f"stats_{anchor.recipe.stats_key}.safetensors"
    if stats_path.exists():
        rows = analysis.routing_table(artifacts.load_stats(stats_path))
        blocks += [
            Block("h3", "Routing frequency per emotion"),
            Block("p", "For each emotion's successful attempts (the anchor's success set): positions at the first "
                       "routed layer, the experts routed to most above the mean over emotions (share of the "
                       "emotion's positions vs. that mean), and the Jensen–Shannon divergence (base 2) of its "
                       "routing from the other emotions', averaged over routed layers."),
            Block("table", {"head": ["emotion", "positions", "most over-routed experts", "JSD vs others"],
                            "rows": [[r.emotion.capitalize(), str(r.positions),
                                      "; ".join(f"{n.split('.mlp')[0]} #{x}: {f:.2f} vs {m:.2f}" for n, x, f, m in r.top),
                                      "n/a" if r.jsd != r.jsd else f"{r.jsd:.3f}"] for r in rows]}),
        ]
    return blocks


def _index_blocks(run: Run, anchor, loaded, fig_dir: Path) -> list[Block]:
    """Indexed hook points (one MLP weight set per codebook position): where the neurons of the anchor's
    recipe sit by index and layer (on the first stream that has indexed hook points; a depth decoder is
    usually ``synth`` while the anchor is ``lm``), as a heatmap and a table of neurons per index."""
    import dataclasses

    from esn import analysis, artifacts

    if not loaded.layout.indexed:
        for stream in run.cfg.model.streams:
            path = run.rundir.select / f"masks_{dataclasses.replace(anchor.recipe, stream=stream).key}.safetensors"
            if stream != anchor.recipe.stream and path.exists():
                other = artifacts.load_masks(path)
                if other.layout.indexed:
                    loaded = other
                    break
        else:
            return []
    names, counts = analysis.index_counts(loaded.masks, loaded.layout)
    png = plots.index_heatmap(counts, names, list(loaded.masks), fig_dir / "index_layers.png",
                              title=f"{anchor.label} ESNs per index and layer (r = {anchor.rate:g})")
    totals = np.nansum(counts, axis=2)  # [E, X]: over the indexed layers
    return [Block("h3", "Index × layer view (per-codebook MLPs)"),
            Block("p", "Hook points with one MLP weight set per index (a depth decoder's codebook position): "
                       "neuron (k, u) is unit u of index k's MLP. Rows: index; columns: indexed layers ("
                       + ", ".join(names) + ")."),
            Block("img", ("ESNs per index and layer", png.relative_to(run.dir))),
            Block("table", {"head": ["emotion", *[f"index {k}" for k in range(totals.shape[1])]],
                            "rows": [[e.capitalize(), *[str(int(v)) for v in totals[i]]]
                                     for i, e in enumerate(loaded.masks)]})]


def _human_blocks(run: Run, targets: list[str]) -> list[Block]:
    out: list[Block] = []
    sim = run.rundir.select / "human_similarity.json"
    if sim.exists():
        data = read_sealed(sim, _RESELECT)
        rows = [[e.capitalize(), "no success set", "–", "–"] if v.get("no_success") else
                [e.capitalize(), _f(v["jaccard"], ".3f"), _f(100 * v["direct_match"], ".2f") + "%", _f(v["jsd"], ".3f")]
                for e, v in data.items()]
        out += [Block("h2", "Table 5 — ESNs from human- vs judge-filtered successes"),
                Block("table", {"head": ["Emotion", "Jaccard", "Direct match", "JSD"], "rows": rows})]
    summary = human.responses_summary(run)
    if summary is not None:
        rates = summary["rates"]
        png = plots.win_tie_loss(rates, run.rundir.figures / "human_wtl.png", title="Listeners: intervened vs baseline")
        rows = [[e.capitalize() if e != "average" else "Average", *[f"{100 * rates[e][k]:.0f}%" for k in ("win", "tie", "loss")]]
                for e in rates]
        out += [Block("h2", "Figure 8 — human A/B listening (win / tie / loss)"),
                Block("img", ("win tie loss", png.relative_to(run.dir))),
                Block("table", {"head": ["Emotion", "Win", "Tie", "Loss"], "rows": rows})]
    return out


# -- rendering ----------------------------------------------------------------------------------------
def to_markdown(blocks: list[Block]) -> str:
    """The blocks as Markdown (``report.md``)."""
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + b.body)
        elif b.kind == "p":
            out.append(b.body)
        elif b.kind == "code":
            out.append(f"```\n{b.body}\n```")
        elif b.kind == "img":
            alt, rel = b.body
            out.append(f"![{alt}]({rel})")
        elif b.kind in ("table", "clips"):
            head, rows = b.body["head"], b.body["rows"]
            esc = lambda s: _md_cell(s).replace("|", "\\|")  # noqa: E731
            lines = ["| " + " | ".join(esc(h) for h in head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def _md_cell(cell) -> str:
    """A table cell as Markdown: an audio cell (``{"audio": rel, "name", "label"}``) is a link to the clip (the
    path URL-quoted: clip names hold ``%``)."""
    if isinstance(cell, dict):
        return f"[▶ {cell.get('name', 'play')}]({quote(cell['audio'])}) {cell.get('label', '')}".strip()
    return str(cell)


_WORD = re.compile(r"[^\W\d_]{2,}")


def _align(cell) -> str:
    """Figures (numbers, %, CIs, ``–``: no word in them) stay right-aligned, the table's default; text and
    players read from the left."""
    return "" if isinstance(cell, str) and not _WORD.search(cell) else " class='text'"


_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")


def _inline(text) -> str:
    """Escaped text with Markdown's inline code (`` `x` ``) as ``<code>`` and ``**x**`` as ``<strong>``;
    audio cells as players."""
    if isinstance(text, dict):
        label = html.escape(text.get("label", ""))
        return (f"<audio controls preload='none' src='{html.escape(quote(text['audio']))}'></audio>"
                + (f"<br><small>{label}</small>" if label else ""))
    text = _CODE.sub(lambda m: f"<code>{m.group(1)}</code>", html.escape(str(text)))
    return _BOLD.sub(lambda m: f"<strong>{m.group(1)}</strong>", text)


def to_html(blocks: list[Block]) -> str:
    """The blocks as one self-contained HTML page (``report.html``)."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>esn report</title><style>"
             "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "td.text,th.text{text-align:left}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
             "pre{background:#f4f4f4;padding:1em}"
             "code{background:#f1f1f1;padding:0 3px;border-radius:3px;font-size:90%}audio{height:2em;max-width:260px}"
             "</style></head><body>"]
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            parts.append(f"<{b.kind}>{html.escape(b.body)}</{b.kind}>")
        elif b.kind == "p":
            parts.append(f"<p>{_inline(b.body)}</p>")
        elif b.kind == "code":
            parts.append(f"<pre>{html.escape(b.body)}</pre>")
        elif b.kind == "img":
            alt, rel = b.body
            parts.append(f"<p><img src='{html.escape(str(rel))}' alt='{html.escape(alt)}'></p>")
        elif b.kind in ("table", "clips"):
            head = "".join(f"<th>{_inline(h)}</th>" for h in b.body["head"])
            rows = "".join("<tr>" + "".join(f"<td{_align(c)}>{_inline(c)}</td>" for c in r) + "</tr>"
                           for r in b.body["rows"])
            head = f"<tr>{head}</tr>" if any(str(h) for h in b.body["head"]) else ""  # no empty header row
            parts.append(f"<table>{head}{rows}</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(run: Run, extra: list[Block] | None = None) -> Path:
    """Write report.md and report.html. ``extra`` blocks go after the title and are kept in
    ``report_preface.json``, so that later ``esn report`` calls keep them (the demo's disclaimer)."""
    preface = run.dir / "report_preface.json"
    if extra:
        atomic_write_json(preface, [[b.kind, b.body] for b in extra])
    elif preface.exists():
        extra = [Block(kind, body) for kind, body in read_json(preface)]
    blocks = without_missing_figures(build(run), run.dir)
    if extra:
        blocks[1:1] = extra
    atomic_write_text(run.dir / "report.html", to_html(blocks))
    return atomic_write_text(run.dir / "report.md", to_markdown(blocks))


def without_missing_figures(blocks: list[Block], root: Path) -> list[Block]:
    """``blocks`` less the images whose PNG is not under ``root`` (drawn without matplotlib: see
    :mod:`esn.pipeline.plots`), with one note after the title naming the extra that draws them."""
    kept = [b for b in blocks if b.kind != "img" or (root / b.body[1]).is_file()]
    left_out = len(blocks) - len(kept)
    if left_out:
        from esn.install import pip_install

        note = (f"{left_out} figure(s) left out: matplotlib is not installed. Install esn-core's plots extra "
                f"(`{pip_install('esn-core[plots]')}`), then `esn report CONFIG` draws them from the saved "
                "results; nothing is computed again.")
        warnings.warn(note, stacklevel=2)
        kept.insert(1, Block("p", "Note: " + note))
    return kept
