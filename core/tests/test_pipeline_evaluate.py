"""Evaluation metrics on hand-made judged records: Deltas, self/cross/gap, WER, bootstrap CIs."""

from __future__ import annotations

import pytest
from esn.pipeline.config import Setting
from esn.pipeline.grid import BASELINE, grid, summarize
from esn.wer import corpus_wer

TARGETS = ["happy", "sad"]


def rec(setting, mask, source, target, label, text="a b", quality=4.0, split="test_seen"):
    return {"split": split, "setting": setting, "mask": mask, "source": source, "target": target,
            "reference": "a b", "text": text, "labels": {"j": label}, "quality": quality}


def records():
    out = []
    # baseline: happy matched for s1 only, sad never
    for s, lab_h in (("s1", "happy"), ("s2", "neutral")):
        out += [rec(BASELINE, None, s, "happy", lab_h), rec(BASELINE, None, s, "sad", "neutral")]
    # setting "x": happy mask makes both sources happy (+50 pp on happy), sad mask makes s1 sad (+50 on sad)
    for s in ("s1", "s2"):
        out += [rec("x", "happy", s, "happy", "happy", text="a c", quality=3.0),
                rec("x", "happy", s, "sad", "neutral", quality=3.0),
                rec("x", "sad", s, "happy", "neutral", quality=3.0),
                rec("x", "sad", s, "sad", "sad" if s == "s1" else "neutral", quality=3.0)]
    return out


def test_deltas_self_cross_gap_wer_quality():
    res = summarize(records(), ["x"], TARGETS, ["j"], ["test_seen"], n_boot=200, seed=0,
                    wer_fn=lambda r, h: corpus_wer(r, h).wer)
    base = res["test_seen"][BASELINE]
    assert base["judges"]["j"]["baseline"] == {"happy": 50.0, "sad": 0.0, "avg": 25.0}
    x = res["test_seen"]["x"]
    j = x["judges"]["j"]
    # rows = mask emotion, columns = target emotion
    assert j["matrix"] == [[50.0, 0.0], [-50.0, 50.0]]
    assert j["self"] == 50.0 and j["cross"] == -25.0 and j["gap"] == 75.0
    assert j["self_per_target"] == {"happy": 50.0, "sad": 50.0}
    # WER: 2 of 8 cells say "a c" for "a b" -> 2 errors / 16 words
    assert x["wer"] == pytest.approx(12.5) and x["wer_baseline"] == 0.0
    assert x["quality"] == 3.0 and x["quality_baseline"] == 4.0
    lo, hi = j["ci"]["self"]
    assert lo <= 50.0 <= hi
    again = summarize(records(), ["x"], TARGETS, ["j"], ["test_seen"], n_boot=200, seed=0,
                      wer_fn=lambda r, h: corpus_wer(r, h).wer)
    assert again == res  # seeded


def test_grid_order_is_fixed():
    st = Setting("cas", 0.01, 5, "ser", "steer", 1.0)
    g = grid("test_seen", ["s1", "s2"], TARGETS, [st])
    assert len(g) == 2 * 2 + 2 * 2 * 2
    assert g[0].id == "test_seen|baseline|-|s1|happy"
    assert g[4].id == "test_seen|cas_r0.01_c5_steer_a1|happy|s1|happy"


def test_all_cells_figure_self_wer_unscored_and_predicted_labels():
    recs = records()
    recs[0]["quality"] = None  # a baseline clip UTMOS could not score
    recs[4]["labels"] = {"j": None}  # the judge gave no label for one steered clip (a miss)
    recs[4]["quality"] = None
    res = summarize(recs, ["x"], TARGETS, ["j"], ["test_seen"], n_boot=50, seed=0,
                    wer_fn=lambda r, h: corpus_wer(r, h).wer)["test_seen"]
    x, base = res["x"], res[BASELINE]
    j = x["judges"]["j"]
    # one clip of the happy-mask/happy cell lost its label: that cell falls from 100% to 50% matched
    assert j["matrix"] == [[0.0, 0.0], [-50.0, 50.0]]
    # the paper's single Random figure: the mean Delta over all 4 cells
    assert j["all"] == pytest.approx((0.0 + 0.0 - 50.0 + 50.0) / 4) and "all" in j["ci"]
    # WER over the self cells only: the two happy/happy cells hold both "a c" errors -> 2 / 8 words
    assert x["wer"] == pytest.approx(12.5) and x["wer_self"] == pytest.approx(25.0)
    assert x["n"] == 8 and j["unlabelled"] == 1 and x["quality_unscored"] == 1
    assert base["n"] == 4 and base["quality_unscored"] == 1 and base["judges"]["j"]["unlabelled"] == 0
    assert base["judges"]["j"]["predicted"] == {"happy": {"happy": 50.0, "neutral": 50.0}, "sad": {"neutral": 100.0}}
    assert "predicted" not in j
