"""``esn report --compare RUN...``: the paper's cross-model tables and figure from several run directories.

Table 2 puts each model's baseline side by side (match % per target emotion and judge, WER, UTMOS); Table 3
stacks each model's selector comparison on its anchor stream, model by model, in the paper's row order
(Random, LAP, LAPE, MAD, CAS, CAS-H); Table 4 stacks their strength sweeps, Table 6 their selector comparison
on the synthesis stream (runs that recorded one), and Figure 9 draws where each model's anchor-selector
masks sit across relative layer depth, one line per model and stream. Each run is read from its own
directory (``manifest.json`` for the config, ``evaluate/results.json``, ``select/masks_*``); nothing is
recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from esn.errors import EsnError
from esn.pipeline import evaluate
from esn.pipeline.config import RunConfig, format_validation, settings
from esn.pipeline.files import atomic_write_text, read_json
from esn.pipeline.grid import BASELINE
from esn.pipeline.report import Block, _f, effect_table, no_success_name, sweeps, to_html, to_markdown

PAPER_ORDER = ("random", "lap", "lape", "mad", "cas")  # Table 3's rows, top to bottom


def paper_order(sts) -> list:
    """Settings in the paper's selector order (Random first, CAS-H after CAS; unknown selectors last)."""
    rank = {name: k for k, name in enumerate(PAPER_ORDER)}
    return sorted(sts, key=lambda st: (rank.get(st.selector, len(rank)), st.labels == "human", st.selector))


@dataclass
class RunResults:
    """One run directory's config and metrics, as the comparison needs them."""

    name: str
    root: Path
    cfg: RunConfig
    results: dict

    @property
    def group(self) -> str:
        """The group its tables pool: ``"all"`` splits when there are several, else the one split."""
        return "all" if "all" in self.results["groups"] else self.results["meta"]["splits"][0]

    @property
    def judges(self) -> list[str]:
        """Its emotion judges, the deciding one first."""
        return self.results["meta"]["judges"]


def load_run_results(root: str | Path, name: str | None = None) -> RunResults:
    """A finished run directory (or the config file that names one)."""
    root = Path(root)
    if root.is_file():
        from esn.pipeline.config import load_config

        root = load_config(root).run_dir
    manifest = root / "manifest.json"
    results = root / "evaluate" / "results.json"
    for path, what in ((manifest, "a run directory (no manifest.json)"), (results, "evaluated (no evaluate/results.json)")):
        if not path.is_file():
            raise EsnError(f"{root} is not {what}; give run directories of finished runs")
    try:
        cfg = RunConfig.model_validate(read_json(manifest)["config"])
    except ValidationError as exc:
        raise EsnError(format_validation(exc, str(manifest))) from None
    except (KeyError, TypeError):
        raise EsnError(f"{manifest}: no config in this manifest") from None
    if name is None:
        name = f"{cfg.model.adapter} ({Path(cfg.model.source).name})"
    return RunResults(name, root, cfg, evaluate.results(results))


def compare_blocks(runs: Sequence[RunResults]) -> list[Block]:
    """Tables 2, 3, 4 and 6 across the runs, with the provenance of each column."""
    if len(runs) < 2:
        raise EsnError("--compare needs at least two run directories")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise EsnError(f"two runs have the same name {names}; name them with --names")
    targets = list(dict.fromkeys(t for r in runs for t in r.results["meta"]["targets"]))
    def describe(r: RunResults) -> str:
        groups = r.results["groups"]
        sizes = ", ".join(f"{s}: {groups[s][BASELINE]['n_sources']} sources" for s in r.results["meta"]["splits"])
        return f"**{r.name}**: `{r.root}`, judges {' / '.join(r.judges)}, {r.group.replace('_', '-')} ({sizes})"

    blocks = [Block("h1", "esn model comparison"),
              Block("p", "Runs: " + "; ".join(describe(r) for r in runs)
                    + ". Match cells give each run's judges in its own order (a / b).")]

    def baseline(r: RunResults) -> dict:
        return r.results["groups"][r.group][BASELINE]

    unselected = {t for r in runs for t in r.results["groups"][r.group].get(settings(r.cfg)[0].key, {})
                  .get("no_success", [])}
    rows = []
    for t in targets:
        rows.append([no_success_name(t, unselected),
                     *[" / ".join(_f(baseline(r)["judges"][j]["baseline"].get(t), ".2f") for j in r.judges)
                       for r in runs]])
    rows.append(["Avg.", *[" / ".join(_f(baseline(r)["judges"][j]["baseline"]["avg"], ".2f") for j in r.judges)
                           for r in runs]])
    rows.append(["WER %", *[_f(baseline(r)["wer_baseline"], ".2f") for r in runs]])
    rows.append(["UTMOS", *[_f(baseline(r)["quality_baseline"], ".2f") for r in runs]])
    blocks += [Block("h2", "Table 2 — baseline EVC performance (no intervention)"),
               Block("table", {"head": ["", *names], "rows": rows})]
    if unselected:
        blocks.append(Block("p", f"No success set (nothing selected, so no mask row in the tables below) for "
                                 f"{', '.join(sorted(unselected))} in at least one run; each row names the "
                                 "emotions it leaves out."))

    anchors = [f"{r.name}: {settings(r.cfg)[0].stream} stream, r = {settings(r.cfg)[0].rate:g}, c = "
               f"{settings(r.cfg)[0].c}, {settings(r.cfg)[0].method} α = {settings(r.cfg)[0].alpha:g}" for r in runs]
    table3 = _stacked(runs, lambda r, sw, a: [(st.label, st) for st in paper_order(sw["selectors"][a.stream])],
                      "Selector")
    blocks += [Block("h2", "Table 3 — ESN selectors under each model's anchor intervention"),
               Block("p", f"Δ emotion match vs each model's own baseline, pp. Anchors: {'; '.join(anchors)}. "
                          "Random gives one figure, the mean Δ over all mask × target cells."),
               Block("table", table3)]
    table4 = _stacked(runs, lambda r, sw, a: [(f"α = {st.alpha:g}", st) for st in sw["alpha"]] if len(sw["alpha"]) > 1
                      else [], "α")
    if table4["rows"]:
        blocks += [Block("h2", "Table 4 — intervention strength (each model's anchor selector, method, r and c)"),
                   Block("table", table4)]
    table6 = _stacked(runs, lambda r, sw, a: [(st.label, st) for st in paper_order(sw["selectors"].get("synth", []))]
                      if a.stream != "synth" else [], "Selector")
    if table6["rows"]:
        blocks += [Block("h2", "Table 6 — ESN selectors on the synthesis stream (synth)"),
                   Block("p", "The same settings as Table 3, identified and intervening on the synthesis stream; "
                              "runs that recorded no synth stream are left out."),
                   Block("table", table6)]
    return blocks


def _stacked(runs: Sequence[RunResults], pick, what: str) -> dict:
    """One effect table of every run's rows (``pick(run, sweeps, anchor) -> [(row name, setting)]``), model by
    model; the CI column stays in each run's own report."""
    head, body = ["LALM", what, *effect_table([], ["j"], "j")["head"][1:-1]], []
    for r in runs:
        sts = settings(r.cfg)
        chosen = pick(r, sweeps(sts), sts[0])
        if not chosen:
            continue
        g = r.results["groups"][r.group]
        missing = [st.key for _, st in chosen if st.key not in g]
        if missing:
            raise EsnError(f"{r.root}: results.json lacks setting(s) {missing}; run `esn evaluate` there again")
        random_rows = {name for name, st in chosen if st.selector == "random"}
        table = effect_table([(name, g[st.key]) for name, st in chosen], r.judges, r.judges[0], random_rows)
        body += [[r.name if k == 0 else "", *row[:-1]] for k, row in enumerate(table["rows"])]
    return {"head": head, "rows": body}


def layer_depth(runs: Sequence[RunResults]) -> list[tuple[str, list[float], list[float]]]:
    """Figure 9 across models: per run and stream, the share of the anchor selector's selected neurons
    (every emotion pooled) in each layer, at relative depth ``layer / (layers - 1)`` (0 first, 1 last)."""
    from esn import artifacts
    from esn.analysis import layer_counts

    out = []
    for r in runs:
        sts = settings(r.cfg)
        a = sts[0]
        for stream in r.cfg.model.streams:
            rows = [st for st in sweeps(sts)["selectors"].get(stream, []) if st.selector == a.selector
                    and st.labels == a.labels] or ([a] if a.stream == stream else [])
            path = r.root / "select" / f"masks_{rows[0].mask_key}.safetensors" if rows else None
            if path is None or not path.exists():
                continue
            loaded = artifacts.load_masks(path)
            counts = layer_counts(loaded.masks, loaded.layout)[stream].sum(axis=0)  # [L]
            total = max(int(counts.sum()), 1)
            depth = [k / max(len(counts) - 1, 1) for k in range(len(counts))]
            out.append((f"{r.name}, {stream} ({rows[0].label})", depth, [float(c) / total for c in counts]))
    return out


def figure_blocks(runs: Sequence[RunResults], out: Path) -> list[Block]:
    """Figure 9 as a PNG next to ``out`` (``<out stem>_layers.png``), linked relative to ``out``."""
    from esn.pipeline import plots

    lines = layer_depth(runs)
    if not lines:
        return []
    png = plots.layer_depth_lines(lines, out.with_name(f"{out.stem}_layers.png"),
                                  title="Selected neurons across relative layer depth (anchor selector, r, c)")
    return [Block("h2", "Figure 9 — selected neurons across relative layer depth, per model and stream"),
            Block("p", "Share of each model's anchor-selector mask (all emotions pooled) in each decoder layer, "
                       "layers placed at relative depth 0 (first) to 1 (last) so that models of different depths "
                       "line up. It shows where selected neurons sit, not how much they do."),
            Block("img", ("selected neurons across relative layer depth", png.name))]


def write_comparison(runs: Sequence[RunResults], out: str | Path) -> Path:
    """Write ``out`` (Markdown) and the same tables as HTML next to it; returns the Markdown path."""
    out = Path(out)
    blocks = compare_blocks(runs) + figure_blocks(runs, out)
    atomic_write_text(out.with_suffix(".html"), to_html(blocks))
    return atomic_write_text(out, to_markdown(blocks))
