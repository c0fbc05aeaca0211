"""``esn report --compare RUN...``: the paper's cross-model tables from several run directories.

Table 2 puts each model's baseline side by side (match % per target emotion and judge, WER, UTMOS); Table 3
stacks each model's selector comparison on its anchor stream, model by model, as the paper prints it.
Each run is read from its own directory (``manifest.json`` for the config, ``evaluate/results.json``);
nothing is recomputed.
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
from esn.pipeline.report import Block, _f, effect_table, sweeps, to_html, to_markdown


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
    """Tables 2 and 3 across the runs, with the provenance of each column."""
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

    rows = []
    for t in targets:
        rows.append([t.capitalize(), *[" / ".join(_f(baseline(r)["judges"][j]["baseline"].get(t), ".2f") for j in r.judges)
                                       for r in runs]])
    rows.append(["Avg.", *[" / ".join(_f(baseline(r)["judges"][j]["baseline"]["avg"], ".2f") for j in r.judges)
                           for r in runs]])
    rows.append(["WER %", *[_f(baseline(r)["wer_baseline"], ".2f") for r in runs]])
    rows.append(["UTMOS", *[_f(baseline(r)["quality_baseline"], ".2f") for r in runs]])
    blocks += [Block("h2", "Table 2 — baseline EVC performance (no intervention)"),
               Block("table", {"head": ["", *names], "rows": rows})]

    body, head, anchors = [], [], []
    for r in runs:
        sts = settings(r.cfg)
        anchor = sts[0]
        rows_of = sweeps(sts)["selectors"][anchor.stream]
        g = r.results["groups"][r.group]
        missing = [st.key for st in rows_of if st.key not in g]
        if missing:
            raise EsnError(f"{r.root}: results.json lacks setting(s) {missing}; run `esn evaluate` there again")
        random_rows = {st.label for st in sts if st.selector == "random"}
        table = effect_table([(st.label, g[st.key]) for st in rows_of], r.judges, r.judges[0], random_rows)
        head = ["LALM", "Selector", *table["head"][1:-1]]  # the CI column stays in each run's own report
        body += [[r.name if k == 0 else "", *row[:-1]] for k, row in enumerate(table["rows"])]
        anchors.append(f"{r.name}: {anchor.stream} stream, r = {anchor.rate:g}, c = {anchor.c}, {anchor.method} "
                       f"α = {anchor.alpha:g}")
    blocks += [Block("h2", "Table 3 — ESN selectors under each model's anchor intervention"),
               Block("p", f"Δ emotion match vs each model's own baseline, pp. Anchors: {'; '.join(anchors)}. "
                          "Random gives one figure, the mean Δ over all mask × target cells."),
               Block("table", {"head": head, "rows": body})]
    return blocks


def write_comparison(runs: Sequence[RunResults], out: str | Path) -> Path:
    """Write ``out`` (Markdown) and the same tables as HTML next to it; returns the Markdown path."""
    blocks = compare_blocks(runs)
    out = Path(out)
    atomic_write_text(out.with_suffix(".html"), to_html(blocks))
    return atomic_write_text(out, to_markdown(blocks))
