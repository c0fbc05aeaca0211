"""Run configuration: clear errors naming the field, paths resolved against the config file, the grid."""

from __future__ import annotations

import json

import pytest
from esn.errors import EsnError
from esn.pipeline.config import load_config, mask_recipes, settings

BASE = """
seed = 3
[model]
source = "ckpt"
[data]
root = "esd"
[judges]
emotion = [{name = "emotion2vec"}]
"""


def write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_the_paper_anchor(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.run_dir == tmp_path / "runs" / "run"
    assert cfg.data.root == tmp_path / "esd"
    assert (cfg.anchor.selector, cfg.anchor.rate, cfg.anchor.c, cfg.anchor.method, cfg.anchor.alpha) == (
        "cas", 0.005, 50, "steer", 1.0)
    assert cfg.filter.tau_wer == 0.15 and cfg.record.targets == ["happy", "angry", "sad", "surprise"]
    sts = settings(cfg)
    assert sts[0].key == "cas_r0.005_c50_steer_a1"
    assert [s.selector for s in sts] == ["cas", "random", "lap", "lape", "mad"]


def test_sweeps_are_one_factor_at_a_time(tmp_path):
    cfg = load_config(write(tmp_path, BASE + """
[sweep]
selectors = ["cas", "mad"]
rates = [0.001, 0.005]
c = [10]
alphas = [0.5, 1.0, 2.0]
interventions = [{method = "add", alpha = 0.3}, {method = "deactivate"}]
[filter]
human_labels = "labels.csv"
"""))
    keys = [s.key for s in settings(cfg)]
    assert keys == ["cas_r0.005_c50_steer_a1", "mad_r0.005_c50_steer_a1", "cas_r0.001_c50_steer_a1",
                    "cas_r0.005_c10_steer_a1", "cas_r0.005_c50_steer_a0.5", "cas_r0.005_c50_steer_a2",
                    "cas_r0.005_c50_add_a0.3", "cas_r0.005_c50_deactivate_a0", "cas-h_r0.005_c50_steer_a1"]
    assert [(r.selector, r.rate, r.c, r.labels) for r in mask_recipes(cfg)] == [
        ("cas", 0.005, 50, "ser"), ("mad", 0.005, 50, "ser"), ("cas", 0.001, 50, "ser"), ("cas", 0.005, 10, "ser"),
        ("cas", 0.005, 50, "human")]
    assert cfg.filter.human_labels == tmp_path / "labels.csv"


@pytest.mark.parametrize(("extra", "field", "words"), [
    ("[anchor]\nrate = 1.5\n", "anchor.rate", "less than or equal to 1"),
    ("[anchor]\nrate = 0\n", "anchor.rate", "greater than 0"),
    ("[anchor]\nc = 0\n", "anchor.c", "greater than or equal to 1"),
    ("[anchor]\nalpha = -2.0\n", "anchor", "alpha"),
    ("[anchor]\nalpha = nan\n", "anchor", "finite"),
    ("[filter]\ntau_wer = -0.1\n", "filter.tau_wer", "greater than or equal to 0"),
    ("[filter]\ntau_wer = inf\n", "filter.tau_wer", "finite number"),
    ("[sweep]\nrates = [0.01, 2.0]\n", "sweep.rates", "rates[1] = 2.0"),
    ("[sweep]\nc = [0]\n", "sweep.c", "c[0] = 0"),
    ("[sweep]\nalphas = [-1.0]\n", "sweep.alphas", "alphas[0] = -1.0"),
    ("[sweep]\nlape_quantiles = [0.5, 1.5]\n", "sweep.lape_quantiles", "lape_quantiles[1] = 1.5"),
    ("[record]\nbatchsize = 4\n", "record.batchsize", "unknown key"),
    ("[record]\ntargets = ['happy', 'bored']\n", "record.targets", "unknown emotion 'bored'"),
    ("[anchor]\nmethod = 'scale'\n", "anchor", "unknown intervention 'scale'"),
    ("[record]\npositions = 'prompt'\n", "record.positions", "'all' or 'generated'"),
    ("[evaluate]\npositions = 'decode'\n", "evaluate.positions", "'all' or 'generated'"),
    ("[sweep]\npositions = ['both']\n", "sweep.positions.0", "'all' or 'generated'"),
    ("[selectors.lape]\nquantil = 0.9\n", "selectors", "selector 'lape' has no option 'quantil' (it takes: quantile)"),
    ("[selectors.lape]\nquantile = 1.5\n", "selectors", "LAPE quantile must be in [0, 1]"),
    ("[selectors.random]\nshared = 'yes'\n", "selectors", "shared must be true or false"),
    ("[selectors.nope]\nx = 1\n", "selectors", "unknown selector 'nope'"),
    ("[anchor]\nstream = 'synth'\n", "(top level)", "anchor.stream 'synth' is not recorded"),
])
def test_bad_values_name_the_field(tmp_path, extra, field, words):
    path = write(tmp_path, BASE + extra)
    with pytest.raises(EsnError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and f"  {field}" in msg and words in msg, msg


def test_unknown_top_level_key_and_missing_sections(tmp_path):
    with pytest.raises(EsnError, match=r"(?s)runs_dir: unknown key"):
        load_config(write(tmp_path, 'runs_dir = "x"\n' + BASE))
    with pytest.raises(EsnError, match=r"(?s)  model: Field required.*  judges: Field required"):
        load_config(write(tmp_path, "seed = 1\n[data]\nroot = 'x'\n"))
    with pytest.raises(EsnError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(EsnError, match="not valid TOML"):
        load_config(write(tmp_path, "[model\n"))


def test_json_and_yaml(tmp_path):
    data = {"model": {"source": "ckpt"}, "data": {"root": "esd"}, "judges": {"emotion": [{"name": "e2v"}]},
            "filter": {"tau_wer": 1000.0, "require_match": False}}
    cfg = load_config(write(tmp_path, json.dumps(data), "r.json"))
    assert cfg.filter.tau_wer == 1000.0 and cfg.filter.require_match is False
    yaml = pytest.importorskip("yaml")
    cfg = load_config(write(tmp_path, yaml.safe_dump({**data, "filter": {"tau_wer": 0.3}}), "r.yaml"))
    assert cfg.filter.tau_wer == 0.3


def test_streams_positions_and_selector_options_in_the_grid(tmp_path):
    cfg = load_config(write(tmp_path, BASE.replace('source = "ckpt"', 'source = "ckpt"\nstreams = ["lm", "synth"]') + """
[sweep]
selectors = ["cas", "random"]
alphas = [2.0]
positions = ["generated"]
[selectors.lape]
quantile = 0.9
[selectors.random]
shared = true
"""))
    sts = settings(cfg)
    # the selector comparison on each stream (Table 3, Table 6); other sweeps on the anchor's stream only
    assert [s.key for s in sts] == ["cas_r0.005_c50_steer_a1", "random_r0.005_c50_steer_a1",
                                    "cas_synth_r0.005_c50_steer_a1", "random_synth_r0.005_c50_steer_a1",
                                    "cas_r0.005_c50_steer_a2", "cas_r0.005_c50_gen_steer_a1"]
    assert [r.stats_key for r in mask_recipes(cfg)] == ["c50_ser", "c50_ser", "c50_ser", "c50_ser", "c50_ser_gen"]
    assert cfg.selectors == {"lape": {"quantile": 0.9}, "random": {"shared": True}}
    synth_first = load_config(write(tmp_path, BASE.replace('source = "ckpt"', 'source = "ckpt"\nstreams = ["lm", "synth"]')
                                    + "[anchor]\nstream = 'synth'\n", "s.toml"))
    assert settings(synth_first)[0].stream == "synth"


def test_record_positions_is_a_select_setting(tmp_path):
    """Both position sets are recorded, so changing record.positions keeps the recorded attempts valid."""
    from esn.pipeline.run import Run

    a = Run(load_config(write(tmp_path, BASE))).stage_config()
    b = Run(load_config(write(tmp_path, BASE + "[record]\npositions = 'generated'\n", "b.toml"))).stage_config()
    assert a["record"] == b["record"] and a["select"] != b["select"] and a["evaluate"] != b["evaluate"]
    c = Run(load_config(write(tmp_path, BASE + "[evaluate]\npositions = 'generated'\n", "c.toml"))).stage_config()
    assert c["select"] == a["select"] and c["evaluate"] != a["evaluate"]


def test_lape_quantiles_sweep_lape_at_the_anchor(tmp_path):
    cfg = load_config(write(tmp_path, BASE + """
[sweep]
selectors = ["cas", "lape"]
lape_quantiles = [0.5, 0.95]
"""))
    sts = settings(cfg)
    assert [s.key for s in sts] == ["cas_r0.005_c50_steer_a1", "lape_r0.005_c50_steer_a1",
                                    "lape_r0.005_c50_q0.5_steer_a1", "lape_r0.005_c50_q0.95_steer_a1"]
    assert [s.label for s in sts] == ["CAS", "LAPE", "LAPE q=0.5", "LAPE q=0.95"]
    assert [r.quantile for r in mask_recipes(cfg)] == [None, None, 0.5, 0.95]
