"""``esn.pipeline.claims``: each rule decides from the numbers, both ways, and says "not measured" when its
sweep was not run (results written by hand; the planted runs are in plugins/planted/tests/test_claims.py)."""

from __future__ import annotations

from dataclasses import replace

from esn.pipeline.claims import paper_claims, verdict
from esn.pipeline.config import Setting
from esn.pipeline.report import sweeps

A = Setting("cas", 0.025, 8, "ser", "steer", 1.0)
SETTINGS = [A, replace(A, selector="lap"), replace(A, selector="mad"), replace(A, selector="lape"),
            replace(A, selector="cas", stream="synth"), replace(A, selector="mad", stream="synth"),
            replace(A, rate=0.008), replace(A, rate=0.1), replace(A, alpha=0.3), replace(A, alpha=2.0),
            replace(A, method="deactivate", alpha=0.0)]


def metrics(self_: float, cross: float = 0.0, wer: float = 0.0, ci=None) -> dict:
    j = {"self": self_, "cross": cross, "gap": self_ - cross}
    if ci:
        j["ci"] = {"self": ci}
    return {"judges": {"j": j}, "wer_self": wer, "wer_baseline": 0.0}


def results(**over) -> dict:
    """The planted demo's shape of numbers; ``over`` replaces one setting's metrics (by key)."""
    g = {A.key: metrics(73), SETTINGS[1].key: metrics(0), SETTINGS[2].key: metrics(73), SETTINGS[3].key: metrics(0),
         SETTINGS[4].key: metrics(1), SETTINGS[5].key: metrics(-1), SETTINGS[6].key: metrics(44),
         SETTINGS[7].key: metrics(75, wer=75), SETTINGS[8].key: metrics(42), SETTINGS[9].key: metrics(75, wer=54),
         SETTINGS[10].key: metrics(-25, ci=[-31, -17])}
    g.update({k: v for k, v in over.items()})
    unseen = {A.key: metrics(69, ci=[56, 75])}
    return {"meta": {"judges": ["j"], "splits": ["test_seen", "test_unseen"]},
            "groups": {"all": g, "test_seen": {A.key: metrics(75)}, "test_unseen": over.get("unseen", unseen)}}


def decide(sts=SETTINGS, **over) -> dict[str, str]:
    return {c.name: verdict(c) for c in paper_claims(sts, sweeps(sts), results(**over))}


def test_every_claim_holds_on_the_planted_shape_of_numbers():
    assert set(decide().values()) == {"holds"}


def test_each_rule_reports_a_claim_as_not_holding_when_the_numbers_say_so():
    k = {st.label + str(st.rate) + st.method + str(st.alpha) + st.stream: st.key for st in SETTINGS}
    cases = {
        "sparse masks are weaker": {k["CAS0.008steer1.0lm"]: metrics(72)},
        "too-large masks are worse": {k["CAS0.1steer1.0lm"]: metrics(74, wer=1)},
        "moderate α is best": {k["CAS0.025steer2.0lm"]: metrics(80, wer=2)},  # strong α keeps the text
        "deactivation is negative": {k["CAS0.025deactivate0.0lm"]: metrics(-3, ci=[-8, 1])},
        "CAS/MAD ≥ LAP/LAPE": {k["LAP0.025steer1.0lm"]: metrics(80)},
        "synthesis-side steering is inert": {k["CAS0.025steer1.0synth"]: metrics(30)},
        "effects generalise to unseen speakers": {"unseen": {A.key: metrics(2, ci=[-4, 8])}},
    }
    for claim, over in cases.items():
        got = decide(**over)
        assert got[claim] == "does not hold", (claim, got)
        assert all(v == "holds" for name, v in got.items() if name != claim), (claim, got)


def test_an_unswept_factor_is_not_measured():
    got = decide([A, replace(A, selector="lap")])
    assert got["CAS/MAD ≥ LAP/LAPE"] == "holds"
    assert {v for name, v in got.items() if name not in ("CAS/MAD ≥ LAP/LAPE", "effects generalise to unseen speakers")} \
        == {"not measured"}
