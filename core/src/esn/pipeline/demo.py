"""``esn demo``: the whole study on planted ground truth, on two CPU cores in well under three minutes.

The model (``esn-planted``) is a tiny Qwen2 language model whose weights are written by hand: each target
emotion has six known gate neurons that fire when that emotion is asked for and push its expression; a
pitch judge hears the expression. So the demo can show what the paper measures and check it: whether the
selectors recover the planted neurons (recall), and whether steering them gives a self-effect larger than
the cross-effect. Everything is written under one folder: ``checkpoint/``, ``esd/`` (synthetic tones in
ESD's layout), ``demo.toml``, and the run itself (``record/``, ``select/``, ``evaluate/``, ``figures/``,
``report.md``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from esn.errors import EsnError
from esn.pipeline.files import atomic_write_json, atomic_write_text, read_json

SPEAKERS = range(11, 21)
INDICES = range(1, 8)

DEMO_TOML = """\
# esn demo: a planted model (known emotion neurons) and a pitch judge, on synthetic ESD tones.
# Every stage is real; the model and the corpus are synthetic. See docs/demo.md.
run_dir = "."
seed = 0
notes = ""

[model]
adapter = "planted"
source = "checkpoint"
streams = ["lm"]

[generation]
max_new_tokens = 8

[data]
kind = "esd"
root = "esd"
# A miniature of the paper's Table 1: seen speakers 0011-0018, unseen 0019-0020.
splits.identification = [{speakers = ["0011", "0012", "0013", "0014", "0015", "0016"], first = 1, last = 6}]
splits.development = [{speakers = ["0017", "0018"], first = 1, last = 6}]
splits.test_seen = [{speakers = ["0011", "0012", "0013", "0014", "0015", "0016", "0017", "0018"], first = 7, last = 7}]
splits.test_unseen = [{speakers = ["0019", "0020"], first = 1, last = 2}]

[judges]
emotion = [{name = "planted"}]

[record]
batch_size = 36
save_audio = true

[filter]                    # the paper's filter
tau_wer = 0.15
require_match = true

[anchor]                    # the paper's anchor, but r = 2.5%: 6 of the 256 neurons per emotion (as planted)
selector = "cas"
rate = 0.025
c = 8
method = "steer"
alpha = 1.0

[sweep]
selectors = ["random", "lap", "lape", "mad", "cas"]
rates = [0.008, 0.1]        # 2 and 25 of the 256 neurons: sparser and larger than the planted set
alphas = [0.3, 2.0]
interventions = [{method = "deactivate"}]
positions = ["generated"]
lape_quantiles = [0.25, 0.5, 0.75]   # LAPE's open percentile (the plain LAPE row uses 0.95)

[evaluate]
splits = ["test_seen", "test_unseen"]
batch_size = 128
bootstrap = 200
save_audio = true
"""

REAL_TOML = """\
[model]
adapter = "qwen_omni"
source = "Qwen/Qwen2.5-Omni-7B"      # or a local checkpoint directory
dtype = "bfloat16"
device = "cuda"

[data]
root = "/data/ESD"                    # the folder with 0011/ ... 0020/ (or 'Emotion Speech Dataset/')

[judges]
emotion = [{name = "emotion2vec"}, {name = "lalm_judge"}]   # emotion2vec+ large, Qwen3-Omni judge
quality = {name = "utmos"}

[record]
save_audio = true                     # keep clips for the human labelling kit (CAS-H)

[sweep]                               # Table 3 selectors, Table 4 strengths, Figures 4-6
rates = [0.001, 0.003, 0.01]
c = [10, 20, 100]
alphas = [0.3, 0.5, 2.0]
interventions = [{method = "add", alpha = 0.3}, {method = "clamp", alpha = 0.1}, {method = "deactivate"}]"""


def write_inputs(out: Path, console: Console, *, plant: dict | None = None, toml: str = DEMO_TOML) -> Path:
    """Planted checkpoint (``plant``: options of a variant, see ``esn_planted.model.build``), synthetic ESD
    and demo.toml (``toml``; the checkpoint and corpus are skipped if already there)."""
    from esn.pipeline.synthetic import write_esd
    from esn.plugins import registry

    reg = registry()
    if "planted" not in reg.adapters or "planted" not in reg.judges:
        from esn.install import pip_install

        raise EsnError(f"esn demo needs the esn-planted plugin: {pip_install('esn-planted')} (docs/install.md; "
                       "`make setup` installs it)")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "checkpoint" / "planted.json").exists():
        console.print("writing the planted model (known emotion neurons)")
        reg.adapter("planted").write_tiny(out / "checkpoint", **{"seed": 0, **(plant or {})})
    if not (out / "esd" / ".complete").exists():
        console.print("writing the synthetic ESD corpus")
        write_esd(out / "esd", SPEAKERS, INDICES, seconds=0.5)
        atomic_write_text(out / "esd" / ".complete", "")
    config = out / "demo.toml"
    atomic_write_text(config, toml)
    return config


def recall(run) -> dict:
    """Per selector (at the anchor's r and c), the share of each emotion's planted neurons its mask holds.

    Written to ``planted.json`` in the run directory, with the anchor's self- and cross-effect."""
    from esn.pipeline import evaluate, select
    from esn.pipeline.claims import claims_json, paper_claims
    from esn.pipeline.config import settings
    from esn.pipeline.report import sweeps

    truth = read_json(Path(run.cfg.model.source) / "planted.json")["planted"]
    sts = settings(run.cfg)
    sw = sweeps(sts)
    targets = run.cfg.record.targets
    out: dict = {"planted": {e: len(truth[e]) for e in targets}, "recall": {}}
    for st in sw["selectors"][sts[0].stream] + sw["lape_quantile"]:
        masks = select.masks(run, st.mask_key).masks
        out["recall"][st.label] = {e: round(float(np.isin(truth[e], masks[e].indices).mean()), 6) for e in targets}
    res = evaluate.results(run.rundir.evaluate / "results.json")
    out["no_success"] = res["groups"][res["meta"]["splits"][0]][sts[0].key].get("no_success", [])
    out["claims"] = claims_json(paper_claims(sts, sw, res))
    judge = res["meta"]["judges"][0]
    for group in ("all", *res["meta"]["splits"]):
        if group in res["groups"]:
            m = res["groups"][group][sts[0].key]["judges"][judge]
            out.setdefault("anchor", {})[group] = {k: m[k] for k in ("self", "cross", "gap")}
    atomic_write_json(run.dir / "planted.json", out)
    return out


def _recall_cells(found: dict, r: dict) -> list[str]:
    """One selector's recall per emotion and its mean over the emotions that had a success set."""
    emotions = list(found["planted"])
    none = set(found.get("no_success", []))
    kept = [r[e] for e in emotions if e not in none]
    return [*["no success set" if e in none else f"{100 * r[e]:.0f}%" for e in emotions],
            f"{100 * np.mean(kept):.0f}%" if kept else "–"]


BY_CONSTRUCTION = ("On the planted model these hold by construction, not as evidence about real models: "
                   "always-on neurons were planted for LAP to pick and emotion-specific ones with the largest "
                   "margin for CAS and MAD (so CAS/MAD ≥ LAP/LAPE); generic neurons carry the text and the planted "
                   "ones a little of it (so masks larger than the planted set, and strong α, raise WER while α = 1 "
                   "keeps it); the planted neurons' effect saturates (so a sparser mask is weaker); and the unseen "
                   "speakers' sources reach the same neurons. What the run measures is whether the method and the "
                   "pipeline find and show them; a rule not met is reported as not holding.")


def claims_blocks(found: dict) -> list:
    """The paper's claims as decided on this run (``esn.pipeline.claims``): verdict, numbers, rule."""
    from esn.pipeline.blocks import Block
    from esn.pipeline.claims import Claim, verdict

    rows = [[c.name, verdict(c), c.evidence, c.rule] for c in (Claim(**d) for d in found["claims"])]
    return [Block("h2", "The paper's claims on this model"),
            Block("p", "Each claim is decided from this run's numbers (judge `planted`, all test splits pooled "
                       "unless the rule names a split) by the rule in its row. " + BY_CONSTRUCTION),
            Block("table", {"head": ["claim", "verdict", "measured", "rule"], "rows": rows})]


def planted_blocks(found: dict) -> list:
    """The report's opening blocks for the demo: what is synthetic, the recall table, the claims, the real command."""
    from esn.install import pip_install
    from esn.pipeline.blocks import Block

    emotions = list(found["planted"])
    rows = [[name, *_recall_cells(found, r)] for name, r in found["recall"].items()]
    a = found["anchor"].get("all") or next(iter(found["anchor"].values()))
    return [
        Block("h2", "Read this first: a synthetic demo with planted ground truth"),
        Block("p", "This report was made by `esn demo`. The model is not a speech model: it is a tiny Qwen2 language "
                   "model (4 layers, 64 gate neurons each) whose weights were written by hand (the esn-planted "
                   "plugin). For each target emotion, 6 gate neurons in layers 1-2 fire when that emotion is asked "
                   "for and push the model towards it; its speech codes are rendered as tones whose pitch carries "
                   "the emotion, and the emotion judge (`planted`) hears pitch relative to the source speaker. The "
                   "decoded text is the reference transcript, each word garbled where the model's content signal "
                   "drifts: generic neurons (up to 8 per layer) carry it, and the planted ones a little. The corpus "
                   "is synthetic tones in ESD's layout. So the numbers below are real measurements of a made-up model: they show the method "
                   "finding and steering neurons that are known to matter, not what any real model does."),
        Block("p", f"Planted neurons recovered (share of each emotion's {found['planted'][emotions[0]]} planted neurons "
                   f"in the mask selected at the anchor's r and c). The anchor (CAS, steering α = 1) gives a "
                   f"self-effect of {a['self']:+.1f} pp against a cross-effect of {a['cross']:+.1f} pp "
                   f"(gap {a['gap']:+.1f} pp) on the pitch judge."),
        Block("table", {"head": ["selector", *[e.capitalize() for e in emotions], "mean"], "rows": rows}),
        *claims_blocks(found),
        Block("h2", "Run it for real"),
        Block("p", "Install an adapter and judges the way docs/install.md says (torch first, then "
                   f"`{pip_install('esn-core[plots]', 'esn-qwen-omni', 'esn-emotion2vec', 'esn-utmos')}` "
                   "with the wheels of `make dist`), "
                   "get ESD (the 10 English speakers 0011-0020 are used), and write a config: `esn init study.toml "
                   "--paper` writes the paper's whole protocol (docs/paper.md); a minimal config like this one runs "
                   "the anchor and the selector comparison (Table 1 split, CAS, r = 0.5%, c = 50, steering with "
                   "alpha = 1, tau_wer = 0.15):"),
        Block("code", REAL_TOML),
        Block("p", "Then `esn run study.toml` (kill it any time and run it again: it resumes), or stage by stage with "
                   "`esn record`, `esn select`, `esn evaluate`, `esn report`. See docs/pipeline.md."),
    ]


def print_recall(found: dict, console: Console) -> None:
    """The recall table and the anchor's effects in the terminal."""
    emotions = list(found["planted"])
    table = Table(title="planted neurons recovered (recall at the anchor's r and c)")
    for col in ("selector", *emotions, "mean"):
        table.add_column(col, justify="right")
    for name, r in found["recall"].items():
        table.add_row(name, *_recall_cells(found, r))
    console.print(table)
    claims = Table(title="the paper's claims on this model (rules: report.md)")
    for col in ("claim", "verdict", "measured"):
        claims.add_column(col)
    for c in found["claims"]:
        claims.add_row(c["name"], "not measured" if c["holds"] is None else ("holds" if c["holds"] else "does not hold"),
                       c["evidence"])
    console.print(claims)
    for group, a in found["anchor"].items():
        console.print(f"anchor CAS, steer α=1, {group}: self-effect {a['self']:+.1f} pp, cross-effect "
                      f"{a['cross']:+.1f} pp, gap {a['gap']:+.1f} pp")


def run_demo(out: str | Path, *, console: Console | None = None, plant: dict | None = None,
             toml: str = DEMO_TOML) -> Path:
    """Write the inputs, run every stage and the judge check into ``out``; return ``out/report.md``.
    ``plant`` and ``toml`` make a variant (tests): a planted model built otherwise, another study config."""
    from rich.text import Text

    from esn.pipeline.config import load_config
    from esn.pipeline.judge_eval import judge_eval
    from esn.pipeline.preflight import check
    from esn.pipeline.report import write_report
    from esn.pipeline.run import Run
    from esn.pipeline.rundir import RunDir
    from esn.pipeline.stages import run_stages

    console = console or Console(quiet=True)
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise EsnError(f"--out {out} exists and is not a folder")
    RunDir(out).claim(mark=True)  # a new or empty folder, or an earlier demo's: never someone else's files
    config = write_inputs(out, console, plant=plant, toml=toml)
    cfg = load_config(config)
    run = Run(cfg, console=console)
    check(run)
    with run:
        console.rule(Text("judge check", style="bold"))
        judge_eval(run, split="development", per_emotion=12)
        for stage in ("record", "select", "evaluate"):
            console.rule(Text(stage, style="bold"))
            run_stages(run, [stage])
        found = recall(run)
        console.rule(Text("report", style="bold"))
        path = write_report(run, extra=planted_blocks(found))
        print_recall(found, console)
        return path
