"""The paper's qualitative claims, each decided from a finished run's numbers by a stated rule.

Every rule reads ``evaluate/results.json`` (the deciding judge, the pooled group) and the run's settings;
nothing is assumed. A claim whose sweep was not run is "not measured" (``holds is None``); one the numbers
contradict is reported as not holding. ``esn demo`` prints them for the planted model, where the model is
built so that each can be seen (docs/demo.md says which hold by construction there).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from esn.pipeline.config import Setting

MARGIN_PP = 2.0  # a difference of effects (pp) smaller than this is no difference
CONTENT_PP = 5.0  # WER may rise this much (pp, self cells, vs the baseline) and the content still counts as kept
INERT_PP = 5.0  # a stream whose every selector's self-cross gap stays under this steers nothing emotion-specific


@dataclass
class Claim:
    """One claim of the paper on one run: whether it holds (None: not measured), the rule and the numbers."""

    name: str
    holds: bool | None
    rule: str
    evidence: str


def _fmt(v: float | None) -> str:
    return "–" if v is None or v != v else f"{v:+.1f}"


def paper_claims(sts: list[Setting], sweep: dict, results: dict) -> list[Claim]:
    """The seven claims, in the order of the paper's sections (``sweep``: ``esn.pipeline.report.sweeps``)."""
    meta, groups = results["meta"], results["groups"]
    judge = meta["judges"][0]
    main = "all" if "all" in groups else meta["splits"][0]
    g = groups[main]
    a = sts[0]

    def eff(st: Setting, key: str, group: str = main) -> float:
        v = groups[group].get(st.key, {}).get("judges", {}).get(judge, {}).get(key)
        return float("nan") if v is None else v  # missing: every comparison is False (does not hold)

    def wer_rise(st: Setting) -> float | None:
        m = g.get(st.key, {})
        return None if m.get("wer_self") is None or m.get("wer_baseline") is None else m["wer_self"] - m["wer_baseline"]

    out: list[Claim] = []
    rates = sweep["rate"]
    small = [st for st in rates if st.rate < a.rate]
    rule = (f"the self-effect at the smallest r is more than {MARGIN_PP:g} pp below the anchor's "
            f"(r = {a.rate:g})")
    if small:
        s0 = small[0]
        out.append(Claim("sparse masks are weaker", eff(s0, "self") < eff(a, "self") - MARGIN_PP, rule,
                         f"self {_fmt(eff(s0, 'self'))} pp at r = {s0.rate:g} vs {_fmt(eff(a, 'self'))} pp"))
    else:
        out.append(Claim("sparse masks are weaker", None, rule, "no rate below the anchor's in sweep.rates"))

    large = [st for st in rates if st.rate > a.rate]
    rule = (f"at the largest r the self-cross gap falls more than {MARGIN_PP:g} pp below the anchor's, or WER "
            f"(self cells) rises more than {MARGIN_PP:g} pp above the anchor's")
    if large:
        s1 = large[-1]
        worse_gap = eff(s1, "gap") < eff(a, "gap") - MARGIN_PP
        w1, w0 = g[s1.key].get("wer_self"), g[a.key].get("wer_self")
        worse_wer = w1 is not None and w0 is not None and w1 > w0 + MARGIN_PP
        out.append(Claim("too-large masks are worse", worse_gap or worse_wer, rule,
                         f"r = {s1.rate:g}: gap {_fmt(eff(s1, 'gap'))} pp, WER self {_fmt(w1)}% vs the anchor's "
                         f"gap {_fmt(eff(a, 'gap'))} pp, WER self {_fmt(w0)}%"))
    else:
        out.append(Claim("too-large masks are worse", None, rule, "no rate above the anchor's in sweep.rates"))

    alphas = sweep["alpha"]
    rule = (f"the α with the largest gap among those that keep the content (WER of self cells at most "
            f"{CONTENT_PP:g} pp above the baseline's) is neither the smallest nor the largest α swept, and the "
            "largest α does not keep the content")
    if len(alphas) >= 3:
        kept = [st for st in alphas if wer_rise(st) is not None and wer_rise(st) <= CONTENT_PP]
        best = max(kept, key=lambda st: eff(st, "gap")) if kept else None
        holds = best is not None and best.alpha not in (alphas[0].alpha, alphas[-1].alpha) and alphas[-1] not in kept
        out.append(Claim("moderate α is best", holds, rule, "; ".join(
            f"α = {st.alpha:g}: gap {_fmt(eff(st, 'gap'))} pp, ΔWER self {_fmt(wer_rise(st))} pp" for st in alphas)
            + (f"; best kept α = {best.alpha:g}" if best else "; no α keeps the content")))
    else:
        out.append(Claim("moderate α is best", None, rule, "fewer than three α (anchor and sweep.alphas)"))

    deact = [st for st in sweep["method"] if st.method == "deactivate"]
    rule = "deactivating the anchor masks gives a self-effect below 0 whose 95% CI (if computed) lies below 0"
    if deact:
        st = deact[0]
        ci = g[st.key]["judges"][judge].get("ci", {}).get("self")
        holds = eff(st, "self") < 0 and (ci is None or ci[1] < 0)
        out.append(Claim("deactivation is negative", holds, rule, f"self {_fmt(eff(st, 'self'))} pp"
                         + ("" if ci is None else f", CI [{ci[0]:+.1f}, {ci[1]:+.1f}]")))
    else:
        out.append(Claim("deactivation is negative", None, rule, "no deactivate in sweep.interventions"))

    rows = {st.selector: st for st in sweep["selectors"].get(a.stream, []) if st.labels == "ser"}
    rule = "the smaller self-cross gap of CAS and MAD is at least the larger of LAP's and LAPE's"
    strong, weak = [rows[s] for s in ("cas", "mad") if s in rows], [rows[s] for s in ("lap", "lape") if s in rows]
    if strong and weak:
        lo, hi = min(eff(st, "gap") for st in strong), max(eff(st, "gap") for st in weak)
        out.append(Claim("CAS/MAD ≥ LAP/LAPE", lo >= hi, rule, ", ".join(
            f"{st.label} gap {_fmt(eff(st, 'gap'))} pp" for st in strong + weak)))
    else:
        out.append(Claim("CAS/MAD ≥ LAP/LAPE", None, rule, "needs CAS or MAD and LAP or LAPE in sweep.selectors"))

    rule = "on unseen speakers the anchor's self-effect is above 0 (95% CI above 0, if computed) and above its cross-effect"
    if "test_unseen" in groups and a.key in groups["test_unseen"]:
        m = groups["test_unseen"][a.key]["judges"][judge]
        ci = m.get("ci", {}).get("self")
        holds = m["self"] > 0 and m["gap"] > 0 and (ci is None or ci[0] > 0)
        seen = eff(a, "self", "test_seen") if "test_seen" in groups else None
        out.append(Claim("effects generalise to unseen speakers", holds, rule,
                         f"unseen self {_fmt(m['self'])} pp, gap {_fmt(m['gap'])} pp"
                         + ("" if ci is None else f", CI [{ci[0]:+.1f}, {ci[1]:+.1f}]")
                         + ("" if seen is None else f"; seen self {_fmt(seen)} pp")))
    else:
        out.append(Claim("effects generalise to unseen speakers", None, rule, "no test_unseen split evaluated"))

    synth = [st for st in sweep["selectors"].get("synth", []) if st.selector != "random"]
    rule = f"on the synth stream every selector's self-cross gap is below {INERT_PP:g} pp"
    if synth and a.stream != "synth":
        gaps = [(st.label, eff(st, "gap")) for st in synth]
        out.append(Claim("synthesis-side steering is inert", all(v < INERT_PP for _, v in gaps), rule,
                         ", ".join(f"{name} gap {_fmt(v)} pp" for name, v in gaps)))
    else:
        out.append(Claim("synthesis-side steering is inert", None, rule, "no synth stream recorded"))
    return out


def claims_json(claims: list[Claim]) -> list[dict]:
    """The claims as JSON rows (``planted.json``)."""
    return [asdict(c) for c in claims]


def verdict(c: Claim) -> str:
    """``holds`` / ``does not hold`` / ``not measured``."""
    return "not measured" if c.holds is None else ("holds" if c.holds else "does not hold")

