"""select and report on a run directory built without a model: planted statistics (``esn.testbed``) stored as
the record stage stores them (with the prompt/generated split), and evaluation batches made by hand.

Checks the paper-fidelity options end to end: selection per stream, shared Random, selector options reaching
the selector and the mask metadata, P over all or generated positions, the CAS-H success sets, and the
report's protocol header, Table 3 / Table 6 titles, the single Random figure, and ``esn report --compare``.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from esn import artifacts
from esn.errors import EsnError
from esn.pipeline import compare, evaluate, select
from esn.pipeline.batches import chunks
from esn.pipeline.config import load_config, settings
from esn.pipeline.files import atomic_write_json, read_json, seal
from esn.pipeline.grid import BASELINE
from esn.pipeline.report import write_report
from esn.pipeline.run import Run
from esn.selection import n_selected, select_neurons
from esn.statistics import aggregate
from esn.store import AttemptRecord, AttemptStore
from esn.testbed import make_testbed

CONFIG = """
seed = 1
notes = "a run without a model"
[model]
source = "none"
streams = ["lm", "synth"]
[data]
kind = "csv"
root = "corpus.csv"
[judges]
emotion = [{{name = "j"}}]
[record]
positions = "{positions}"
[filter]
human_labels = "human.csv"
[anchor]
rate = 0.05
c = 30
[sweep]
selectors = ["random", "lap", "lape", "mad", "cas"]
positions = ["{other}"]
alphas = [2.0]
lape_quantiles = [0.2, 0.9]
[selectors.lape]
quantile = 0.5
[selectors.random]
shared = {shared}
[evaluate]
batch_size = 50
bootstrap = 20
"""


def make_run(root: Path, *, positions: str = "all", shared: str = "true", seed: int = 0, edit=None,
             never: str | None = None, scarce: str | None = None) -> Run:
    """A run directory whose record stage is done (planted attempts) and whose evaluate stage is ready;
    ``edit(config text)`` changes the config first. ``never``: an emotion the judge never hears in its own
    attempts (it gets no success set); ``scarce``: one it hears in 3 attempts only (a success set smaller
    than the others and than c)."""
    bed = make_testbed(seed=seed, lm_layers=4, synth_layers=2, width=64)
    root.mkdir(parents=True, exist_ok=True)
    rows = ["path,transcript,speaker,split"]
    for k, split in enumerate(["test_seen", "test_seen", "test_unseen", "test_unseen"]):
        sf.write(root / f"s{k}.wav", np.zeros(1600, np.float32), 16_000)
        rows.append(f"s{k}.wav,a b c,spk{k},{split}")
    (root / "corpus.csv").write_text("\n".join(rows) + "\n")
    other = "generated" if positions == "all" else "all"
    text = CONFIG.format(positions=positions, other=other, shared=shared)
    (root / "study.toml").write_text(edit(text) if edit else text)
    # humans agree with the judge on the WER-passing attempts they were given (the first 20 per emotion)
    ok = [r for r in bed.records if r.text == r.transcript]
    labels = [f"{r.id},{bed.labels[r.id]}" for e in bed.emotions for r in [x for x in ok if x.emotion == e][:20]]
    (root / "human.csv").write_text("id,label\n" + "\n".join(labels) + "\n")
    if never is not None:  # the judge, not the listeners, misses it
        bed.labels.update({r.id: "neutral" for r in bed.records if r.emotion == never})
    if scarce is not None:
        heard = [r.id for r in bed.records if r.emotion == scarce and r.text == r.transcript][:3]
        bed.labels.update({r.id: (scarce if r.id in heard else "neutral") for r in bed.records if r.emotion == scarce})
    run = Run(load_config(root / "study.toml"))
    run.open()
    store = AttemptStore(run.rundir.record, bed.layout, architecture="Synthetic")
    records = [AttemptRecord(r.id, r.emotion, r.transcript, r.text, {"label": bed.labels[r.id]}) for r in bed.records]
    prompt = bed.counts // 3  # a third of each count came from the prompt
    store.append(records, bed.counts, bed.tokens, prompt_counts=prompt, prompt_tokens=bed.tokens // 3, worker="b0")
    atomic_write_json(run.rundir.record / "prompts.json",
                      seal({"adapter": "x", "system_prompt": "Convert the emotion.", "instruction": "Sound {emotion}.",
                           "instruction_channel": True, "speaks_given_words": False, "text_out": True}))
    run.bed = bed
    return run


def fake_evaluation(run: Run) -> None:
    """Batch files as `esn evaluate` writes them: CAS and MAD masks make their own emotion heard."""
    by_id = {s.id: s for split in run.cfg.evaluate.splits for s in run.sources(split)}
    sts = {st.key: st for st in settings(run.cfg)}
    for k, batch in chunks(evaluate.attempts(run), run.cfg.evaluate.batch_size):
        rows = []
        for n, a in enumerate(batch):
            st = sts.get(a.setting)
            works = st is not None and st.selector in ("cas", "mad") and a.mask == a.target
            label = a.target if works or (k + n) % 4 == 0 else "neutral"
            rows.append({"id": a.id, "split": a.split, "setting": a.setting, "mask": a.mask, "source": a.source,
                         "target": a.target, "reference": by_id[a.source].transcript,
                         "text": "a b c" if (k + n) % 5 else "a b", "wer": 0.0, "labels": {"j": label},
                         "quality": None if (k + n) % 7 == 0 else 4.0, "audio": None})
        evaluate.write_batch(run.rundir.evaluate / "batches" / f"{k:06d}.json", rows)
    evaluate.write_results(run)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("run"))
    select.select(run)
    fake_evaluation(run)
    write_report(run)
    yield run
    run.close()


def test_masks_are_selected_per_stream(done):
    run = done
    stats = artifacts.load_stats(run.rundir.select / "stats_c30_ser.safetensors")
    for stream, key in (("lm", "cas_r0.05_c30"), ("synth", "cas_synth_r0.05_c30")):
        ms = select.masks(run, key)
        assert ms.layout.streams == [stream] and ms.meta["stream"] == stream
        sub = stats.select_streams([stream])
        want = select_neurons(sub.probs(), "cas", 0.05, emotions=sub.emotions, seed=1)
        assert {e: m.indices.tolist() for e, m in ms.masks.items()} == {e: want[e].tolist() for e in ms.masks}
        assert max(len(m) for m in ms.masks.values()) <= n_selected(0.05, sub.layout.n_neurons)
    rnd = select.masks(run, "random_synth_r0.05_c30")
    assert all(len(m) == n_selected(0.05, 2 * 64) for m in rnd.masks.values())


def test_shared_random_and_selector_options_reach_the_masks(done):
    run = done
    rnd = select.masks(run, "random_r0.05_c30")
    first = next(iter(rnd.masks.values())).indices
    assert all(np.array_equal(m.indices, first) for m in rnd.masks.values())  # one mask for every emotion
    assert rnd.meta["selector_options"] == {"shared": True}
    lape = select.masks(run, "lape_r0.05_c30")
    assert lape.meta["selector_options"] == {"quantile": 0.5}
    sub = artifacts.load_stats(run.rundir.select / "stats_c30_ser.safetensors").select_streams(["lm"])
    ours = select_neurons(sub.probs(), "lape", 0.05, emotions=sub.emotions, quantile=0.5)
    default = select_neurons(sub.probs(), "lape", 0.05, emotions=sub.emotions)
    assert {e: m.indices.tolist() for e, m in lape.masks.items()} == {e: ours[e].tolist() for e in lape.masks}
    assert any(not np.array_equal(ours[e], default[e]) for e in ours), "the option must change the choice"


def test_lape_quantiles_are_a_sweep_axis_with_their_own_table(done):
    run = done
    sub = artifacts.load_stats(run.rundir.select / "stats_c30_ser.safetensors").select_streams(["lm"])
    for q in (0.2, 0.9):
        ms = select.masks(run, f"lape_r0.05_c30_q{q:g}")
        assert ms.meta["selector_options"] == {"quantile": q}  # the sweep's value, not [selectors.lape]'s 0.5
        want = select_neurons(sub.probs(), "lape", 0.05, emotions=sub.emotions, quantile=q)
        assert {e: m.indices.tolist() for e, m in ms.masks.items()} == {e: want[e].tolist() for e in ms.masks}
    text = (run.dir / "report.md").read_text()
    table = text.split("### Sweep: LAPE percentile")[1].split("#")[0]
    assert "| q = 0.2 (" in table and "| q = 0.9 (" in table
    res = read_json(run.rundir.evaluate / "results.json")
    assert "lape_r0.05_c30_q0.2_steer_a1" in res["groups"]["all"]
    # the plain LAPE row of Table 3 keeps [selectors.lape]: the quantile points are not selector rows
    assert text.split("## Table 3")[1].split("## ")[0].count("LAPE") == 1


def test_p_over_generated_positions_equals_the_generated_counts(done):
    run = done
    gen = artifacts.load_stats(run.rundir.select / "stats_c30_ser_gen.safetensors")
    assert gen.meta["positions"] == "generated"
    sets = read_json(run.rundir.select / "summary.json")["success_sets"]["c30_ser"]
    bed = run.bed
    row = {r.id: i for i, r in enumerate(bed.records)}
    for k, e in enumerate(gen.emotions):
        idx = [row[i] for i in sets[e]]
        np.testing.assert_array_equal(gen.K[k], (bed.counts[idx] - bed.counts[idx] // 3).sum(axis=0))
    ablation = read_json(run.rundir.select / "positions.json")
    assert set(ablation["streams"]) == {"lm", "synth"}
    share = ablation["streams"]["lm"]["prompt_share"]["happy"]
    assert 0.3 < share < 0.34  # tokens // 3 of each attempt
    assert set(ablation["streams"]["lm"]["overlap"]) == {*gen.emotions, "average"}


def test_human_success_sets_and_table_5(done):
    summary = read_json(done.rundir.select / "summary.json")
    human = summary["success_sets"]["c30_human"]
    assert all(0 < len(human[e]) <= 20 for e in human)
    assert (done.rundir.select / "human_similarity.json").exists()
    assert "cas-h_r0.05_c30" in summary["masks"]


def test_report_states_the_protocol_and_titles_tables_by_stream(done):
    text = (done.dir / "report.md").read_text()
    for needle in ("## Protocol", "| system prompt | “Convert the emotion.” |", "| instruction | “Sound {emotion}.”",
                   "| P counts | every position (prompt and generated) |",
                   "| interventions edit | every forward (the prompt and each generated step) |",
                   "“all” pools every mask × target cell", "“self” the cells whose mask emotion is the target",
                   "| unscored clips | `j` left 0 of", "no naturalness judge configured",
                   "| selector options | lape: quantile = 0.5; random: shared = True |",
                   "## Table 3 — selectors on the language-model stream (lm)",
                   "## Table 6 — selectors on the synthesis stream (synth)",
                   "| Random | ", "(all cells) |", "c30 (human, CAS-H)", "### Sweep: positions counted in P",
                   "Ablation: positions counted in P", "Predicted labels of the baseline", "Table 5"):
        assert needle in text, needle
    assert text.count("(all cells)") == 2  # one Random row per stream
    res = read_json(done.rundir.evaluate / "results.json")
    assert res["meta"]["positions"] == {"record": "all", "evaluate": "all"}
    assert read_json(done.rundir.manifest)["config"]["record"]["positions"] == "all"


def test_generated_positions_run_and_compare(done, tmp_path):
    other = make_run(tmp_path / "gen", positions="generated", shared="false", seed=3)
    try:
        select.select(other)
        fake_evaluation(other)
        write_report(other)
        text = (other.dir / "report.md").read_text()
        assert "| P counts | generated positions only" in text
        rnd = select.masks(other, "random_r0.05_c30_gen")
        assert len({tuple(m.indices) for m in rnd.masks.values()}) == 4  # one draw per emotion
        runs = [compare.load_run_results(done.dir, "A"), compare.load_run_results(tmp_path / "gen" / "study.toml", "B")]
        path = compare.write_comparison(runs, tmp_path / "cmp.md")
        md = path.read_text()
        assert "Table 2 — baseline EVC performance" in md and "Table 3 — ESN selectors" in md
        assert "| | A | B |".replace(" ", "") in md.replace(" ", "")
        table3 = md.split("## Table 3")[1].split("## ")[0]
        assert table3.count("| A |") == 1 and table3.count("| B |") == 1 and table3.count("| CAS |") == 2
        # the paper's order: Random first, then LAP, LAPE, MAD, CAS, CAS-H, model by model
        names = [line.split("|")[2].strip() for line in table3.splitlines() if line.startswith("| ")][1:]
        assert names == ["Random", "LAP", "LAPE", "MAD", "CAS", "CAS-H", "Random", "LAP", "LAPE", "MAD", "CAS", "CAS-H"]
        table6 = md.split("## Table 6")[1].split("## ")[0]
        assert table6.count("| A |") == 1 and table6.count("| CAS |") == 2 and "CAS-H" not in table6
        table4 = md.split("## Table 4")[1].split("## ")[0]
        assert table4.count("| A |") == 1 and table4.count("| B |") == 1 and table4.count("| α = 2 |") == 2
        assert table4.count("| α = 1 |") == 2
        assert "## Figure 9" in md and "![selected neurons across relative layer depth](cmp_layers.png)" in md
        png = tmp_path / "cmp_layers.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        lines = compare.layer_depth(runs)
        assert [name for name, _, _ in lines] == ["A, lm (CAS)", "A, synth (CAS)", "B, lm (CAS)", "B, synth (CAS)"]
        for _, depth, share in lines:
            assert depth[0] == 0 and depth[-1] == 1 and sum(share) == pytest.approx(1)
        html = (tmp_path / "cmp.html").read_text()
        assert "<h2>Table 6" in html and "cmp_layers.png" in html
        with pytest.raises(EsnError, match="at least two"):
            compare.compare_blocks(runs[:1])
        with pytest.raises(EsnError, match="same name"):
            compare.compare_blocks([runs[0], compare.load_run_results(done.dir, "B"), runs[1]])
        with pytest.raises(EsnError, match="not a run directory"):
            compare.load_run_results(tmp_path / "gen")
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "manifest.json").write_bytes((other.dir / "manifest.json").read_bytes())
        with pytest.raises(EsnError, match="not evaluated"):
            compare.load_run_results(tmp_path / "half")
    finally:
        other.close()


def test_select_refuses_generated_positions_without_the_split(tmp_path):
    run = make_run(tmp_path / "r", positions="generated")
    try:
        store = AttemptStore(run.rundir.record)
        # rewrite the store as an older esn would have: no prompt split
        for p in store.shard_dir.iterdir():
            p.unlink()
        bed = run.bed
        recs = [AttemptRecord(r.id, r.emotion, r.transcript, r.text, {"label": bed.labels[r.id]}) for r in bed.records]
        store.append(recs, bed.counts, bed.tokens)
        with pytest.raises(EsnError, match="without the prompt/generated split"):
            select.select(run)
        assert aggregate(store, {"happy": [recs[0].id]}).K.sum() > 0  # the "all" reading still works
    finally:
        run.close()


def test_cli_select_positions_override(tmp_path):
    from esn.cli import main

    run = make_run(tmp_path / "r")
    run.close()
    cfg = str(tmp_path / "r" / "study.toml")
    assert main(["select", cfg, "--positions", "generated"]) == 0
    manifest = json.loads((tmp_path / "r" / "runs" / "study" / "manifest.json").read_text())
    assert manifest["config"]["record"]["positions"] == "generated"
    assert (tmp_path / "r" / "runs" / "study" / "select" / "masks_cas_r0.05_c30_gen.safetensors").exists()
    # changing it again over existing select results is refused, naming what changed; the record stays valid
    assert main(["select", cfg]) == 1  # the run directory holds other select results: a runtime failure
    assert BASELINE == "baseline"


def test_labelling_kit_offers_wer_passing_attempts_only(tmp_path):
    """CAS-H: raters label only attempts that passed the WER filter (so CAS vs CAS-H compares the kind of
    supervision, not the success set's size), 2 c per target emotion by default."""
    from esn.pipeline import human
    from esn.wer import wer

    run = make_run(tmp_path / "r")
    try:
        store = AttemptStore(run.rundir.record)
        for p in store.shard_dir.iterdir():
            p.unlink()
        bed = run.bed
        (run.rundir.record / "audio").mkdir()
        tone = (0.1 * np.sin(np.arange(1600) * 2 * np.pi * 220 / 16_000)).astype(np.float32)
        recs = []
        for n, r in enumerate(bed.records):  # every attempt has audio, the WER failures too
            sf.write(run.rundir.record / "audio" / f"a{n}.wav", tone, 16_000)
            recs.append(AttemptRecord(r.id, r.emotion, r.transcript, r.text,
                                      {"label": bed.labels[r.id], "audio": f"audio/a{n}.wav"}))
        store.append(recs, bed.counts, bed.tokens, prompt_counts=bed.counts // 3, prompt_tokens=bed.tokens // 3)
        passing = {r.id for r in bed.records if wer(r.transcript, r.text) <= run.cfg.filter.tau_wer}
        assert len(passing) < len(bed.records)  # the filter has something to remove
        assert human.labels_per_emotion(run) == 2 * run.cfg.anchor.c == 60

        n = human.export_labels(run, tmp_path / "kit")
        key = list(csv.DictReader((tmp_path / "kit-private" / "key.csv").open()))
        assert not (tmp_path / "kit" / "key.csv").exists()  # not in the folder raters get
        assert n == len(key) == len(passing)  # fewer than 60 pass per emotion here: all of them are offered
        assert {row["id"] for row in key} == passing
        assert {row["target"] for row in key} == set(bed.emotions)
        small = human.export_labels(run, tmp_path / "small", per_emotion=4)
        ids = [row["id"] for row in csv.DictReader((tmp_path / "small-private" / "key.csv").open())]
        assert small == 4 * len(bed.emotions) and set(ids) <= passing and len(set(ids)) == len(ids)
        assert "Which emotion do you hear?" in (tmp_path / "small" / "clips.csv").read_text()
    finally:
        run.close()


# -- the report's views for readers: players, curves, depth profiles, names; --json; without matplotlib --------
def _swept_run(root: Path) -> tuple[Run, str]:
    """``make_run`` with α, r and c swept, the model from an absolute folder outside the run directory."""
    def edit(text: str) -> str:
        text = text.replace('source = "none"', 'source = "/models/private/Qwen2.5-Omni-7B"').replace("alphas = [2.0]\n", "")
        return text.replace('positions = ["', 'rates = [0.02, 0.1]\nc = [10]\nalphas = [0.5, 2.0]\n'
                                              'interventions = [{method = "deactivate"}]\npositions = ["')

    make_run(root, edit=edit).close()
    return Run(load_config(root / "study.toml")), str(root / "study.toml")


def _save_some_audio(run: Run) -> None:
    """Give the baseline and anchor rows of the evaluation batches a wav, as evaluate.save_audio does."""
    from esn.pipeline.convert import audio_name
    from esn.pipeline.files import atomic_write_wav

    anchor = settings(run.cfg)[0].key
    for path in sorted((run.rundir.evaluate / "batches").glob("*.json")):
        rows = evaluate.read_batch(path, "a test batch")
        for r in rows:
            if r["setting"] in (BASELINE, anchor):
                r["audio"] = audio_name(r["id"])
                r["audio_sha256"] = atomic_write_wav(run.rundir.evaluate / r["audio"], np.full(800, 0.1, np.float32),
                                                     16_000)
        evaluate.write_batch(path, rows)


@pytest.mark.slow
def test_report_views_players_curves_depth_and_no_machine_paths(tmp_path, capsys):
    from urllib.parse import unquote

    from esn.cli import main

    run, cfg = _swept_run(tmp_path / "r")
    run.open()
    select.select(run)
    fake_evaluation(run)
    _save_some_audio(run)
    run.close()
    assert main(["report", cfg, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # stdout holds the JSON alone
    md, page = Path(out["report"]).read_text(), Path(out["report_html"]).read_text()
    assert out["results"].endswith("evaluate/results.json") and out["masks"]
    # the trade-off curve over α (with α = 0, the baseline, for steer) and the curves over r and c
    assert "## Trade-off curves — effect and WER against α, r and c" in md and "](figures/curves.png)" in md
    assert "## Where the selected neurons sit — lm vs synth" in md and "](figures/depth.png)" in md
    assert (run.dir / "figures" / "curves.png").stat().st_size > 5000 and (run.dir / "figures" / "depth.png").is_file()
    # players: a seeded sample per target, baseline beside steered, paths relative and URL-quoted
    assert "## Listen: baseline vs steered" in md and md.count("[▶ baseline](") == 2 * 4
    sources = re.findall(r"<audio controls preload='none' src='([^']+)'>", page)
    assert len(sources) == 2 * 2 * 4 and all(not s.startswith(("/", "file:")) for s in sources)
    assert all((run.dir / unquote(s)).is_file() for s in sources)
    # inline code is <code>, never literal backticks; panel titles say what the intervention does
    body = re.sub(r"<pre>.*?</pre>", "", page, flags=re.S)
    assert "<code>j</code>" in body and "`" not in body
    assert "| deactivate (g = 0) |" in md and "steer ×2 (α = 1)" in md
    # a report is shared: the checkpoint by its folder name, no path of this machine
    assert "`…/Qwen2.5-Omni-7B`" in md and "/models/private" not in md + page
    assert str(tmp_path) not in md + page


def test_intervention_titles_and_checkpoint_names():
    from esn.pipeline.report_views import display_source, intervention_title

    assert [intervention_title(*m) for m in (("steer", 1.0), ("steer", 0.5), ("deactivate", None), ("add", 0.3),
                                              ("add", -0.2), ("clamp", 0.1))] == [
        "steer ×2 (α = 1)", "steer ×1.5 (α = 0.5)", "deactivate (g = 0)", "add: g + 0.3", "add: g − 0.2",
        "clamp: g ≥ 0.1"]
    assert display_source("Qwen/Qwen2.5-Omni-7B", Path("/runs/x")) == "Qwen/Qwen2.5-Omni-7B"  # a hub id as is
    assert display_source("/data/models/ckpt", Path("/runs/x")) == "…/ckpt"
    assert display_source("/runs/x/checkpoint", Path("/runs/x")) == "checkpoint"  # inside the run directory


HIDE_MATPLOTLIB = "import sys; sys.modules['matplotlib'] = None; from esn.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.slow
def test_a_report_without_matplotlib_keeps_every_table_and_says_which_extra_draws_the_figures(tmp_path):
    """Both ways on one run: without matplotlib (hidden from import in a subprocess) `esn report` exits 0,
    writes every table, drops the images (and stale PNGs) with one note naming the plots extra; with it,
    the same command draws them again from the saved results."""
    import subprocess
    import sys

    run, cfg = _swept_run(tmp_path / "r")
    run.open()
    select.select(run)
    fake_evaluation(run)
    write_report(run)
    run.close()
    with_figures = (run.dir / "report.md").read_text()
    assert with_figures.count("![") >= 5 and "left out" not in with_figures
    done = subprocess.run([sys.executable, "-c", HIDE_MATPLOTLIB, "report", cfg, "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["report"] == str(run.dir / "report.md")
    md, page = (run.dir / "report.md").read_text(), (run.dir / "report.html").read_text()
    assert "![" not in md and "<img" not in page and not list((run.dir / "figures").glob("*.png"))
    note = "figure(s) left out: matplotlib is not installed. Install esn-core's plots extra " \
           "(`pip install --find-links dist 'esn-core[plots]'`)"
    assert md.count(note) == 1 and done.stderr.count("matplotlib is not installed") == 1
    strip = lambda text: [line for line in text.splitlines() if line and not line.startswith(("![", "Note: "))]  # noqa: E731
    assert strip(md) == strip(with_figures)  # every table and paragraph is still there
    done = subprocess.run([sys.executable, "-m", "esn", "report", cfg, "-q"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and (run.dir / "report.md").read_text() == with_figures


def test_an_emotion_without_a_success_set_is_reported_and_the_others_go_on(tmp_path):
    """The paper's Table 3 has emotions hard at baseline: select the others, evaluate them, and say so."""
    run = make_run(tmp_path / "r", never="sad", scarce="happy")
    try:
        select.select(run)
        summary = read_json(run.rundir.select / "summary.json")
        sizes = {e: len(v) for e, v in summary["success_sets"]["c30_ser"].items()}
        assert sizes["happy"] == 3 and sizes["angry"] > 3 and sizes["surprise"] > 3  # unequal sets
        assert summary["success_sets"]["c30_ser"]["sad"] == [] and all(
            summary["success_sets"]["c30_ser"][e] for e in ("angry", "happy", "surprise"))
        assert summary["no_success"]["cas_r0.05_c30"] == ["sad"]
        assert summary["no_success"]["cas-h_r0.05_c30"] == []  # the listeners heard sad: CAS-H has it
        cas = select.masks(run, "cas_r0.05_c30")
        assert len(cas.masks["sad"]) == 0 and all(len(cas.masks[e]) for e in ("angry", "happy", "surprise"))
        # the three selected emotions are selected as they would be without sad at all
        stats = artifacts.load_stats(run.rundir.select / "stats_c30_ser.safetensors").select_streams(["lm"])
        assert sorted(stats.emotions) == ["angry", "happy", "surprise"]
        want = select_neurons(stats.probs(), "cas", 0.05, emotions=stats.emotions, seed=1)
        assert all(cas.masks[e].indices.tolist() == want[e].tolist() for e in stats.emotions)
        # the grid converts every target, but no sad mask row
        grid = evaluate.attempts(run)
        cas_rows = [a for a in grid if a.setting == "cas_r0.05_c30_steer_a1"]
        assert {a.mask for a in cas_rows} == {"angry", "happy", "surprise"}
        assert {a.target for a in cas_rows} == {"angry", "happy", "sad", "surprise"}
        fake_evaluation(run)
        res = read_json(run.rundir.evaluate / "results.json")
        m = res["groups"]["all"]["cas_r0.05_c30_steer_a1"]
        assert m["no_success"] == ["sad"]
        j = m["judges"]["j"]
        assert j["self_per_target"]["sad"] is None and j["matrix"][2] == [None] * 4
        # self is the mean over the three selected emotions' own cells only
        mats = j["matrix"]
        assert j["self"] == pytest.approx(np.mean([mats[i][i] for i in (0, 1, 3)]), abs=1e-5)
        write_report(run)
        text = (run.dir / "report.md").read_text()
        assert "0 (no success set)" in text  # success sets
        assert "| cas_r0.05_c30 | sad (no success set) | 0 |" in text  # the masks smaller than floor(r N)
        assert "| Sad (no success set) |" in text  # Table 2
        table3 = text.split("## Table 3")[1].split("## ")[0]
        assert "| CAS (sad: no success set) |" in table3 and "| MAD (sad: no success set) |" in table3
        assert "no success set" in text.split("## Figure 10")[1]
    finally:
        run.close()


def test_the_seen_unseen_legend_sits_beside_the_bars(tmp_path, monkeypatch):
    """Figure 10's legend never covers a bar: it is drawn outside the axes (checked on the drawn figure)."""
    pytest.importorskip("matplotlib")
    from esn.pipeline import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: (drawn.append(fig), path)[1])
    full = {e: 100.0 for e in ("happy", "angry", "sad", "surprise")}  # bars up to the top, where legends go
    plots.seen_unseen_bars({"test_seen": full, "test_unseen": full}, {}, list(full), tmp_path / "x.png", title="t")
    (fig,) = drawn
    fig.canvas.draw()
    ax = fig.axes[0]
    assert not ax.get_legend().get_window_extent().overlaps(ax.get_window_extent())
