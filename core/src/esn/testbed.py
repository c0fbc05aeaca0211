"""A synthetic test bed: per-attempt gate statistics with planted emotion-selective neurons.

Every neuron has a base probability of a positive gate. On top of it:

* planted neurons of emotion e: +``boost`` when the attempt's (true) emotion is e. These are the ESNs a
  selector should find;
* always-on generic neurons: positive 90-98% of the time whatever the emotion (the paper's argument
  against LAP: frequency alone picks these);
* emotion-suppressed neurons of e: often positive, except under e;
* noise: a per-attempt shift of every probability and binomial sampling of the counts.

Success sets have unequal sizes per emotion, and failed attempts are mixed in: some judged as another
emotion, some with a decoded text far from the transcript. Failures carry another emotion's pattern, so
they contaminate the statistics unless the success filter removes them. The attempts go through the real
path (``AttemptStore`` -> ``filter_attempts`` -> ``aggregate`` -> ``select_neurons``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from esn.emotions import TARGET_EMOTIONS
from esn.filtering import TAU_WER, filter_attempts
from esn.hookpoints import HookPoint, Layout
from esn.plugins import Registry
from esn.selection import select_neurons
from esn.statistics import aggregate
from esn.store import AttemptRecord, AttemptStore

SELECTORS = ("lap", "lape", "mad", "cas", "random")
_WORDS = "kids are talking by the door please call stella ask her to bring these things with her".split()


@dataclass
class TestBed:
    """Synthetic attempts (``counts [A, N]``, ``tokens [A, H]``), their judge labels, and the truth."""

    __test__ = False  # not a pytest class

    layout: Layout
    emotions: list[str]
    records: list[AttemptRecord]
    counts: np.ndarray  # [A, N] int64
    tokens: np.ndarray  # [A, H] int64
    labels: dict[str, str]  # the judge's label per attempt id
    planted: dict[str, np.ndarray]  # emotion -> sorted flat indices
    always_on: np.ndarray
    suppressed: dict[str, np.ndarray]

    @property
    def rate(self) -> float:
        """The r whose N_sel equals the planted set size."""
        return len(next(iter(self.planted.values()))) / self.layout.n_neurons

    def write(self, store: AttemptStore, shard_size: int = 16) -> None:
        """Append every attempt to ``store``, ``shard_size`` per shard, from alternating workers."""
        for k, start in enumerate(range(0, len(self.records), shard_size)):
            rows = slice(start, start + shard_size)
            store.append(self.records[rows], self.counts[rows], self.tokens[rows], worker=f"w{k % 3}")


def make_testbed(
    *,
    seed: int = 0,
    emotions: Sequence[str] = TARGET_EMOTIONS,
    successes: Sequence[int] = (40, 12, 25, 8),
    failures: int = 10,
    n_planted: int = 16,
    n_always_on: int = 64,
    n_suppressed: int = 16,
    boost: float = 0.4,
    lm_layers: int = 4,
    synth_layers: int = 2,
    width: int = 256,
) -> TestBed:
    """Build the test bed; deterministic given ``seed``. ``successes[k]`` attempts of ``emotions[k]``
    succeed, and ``failures`` more per emotion fail (half on the judge, half on WER)."""
    rng = np.random.default_rng(seed)
    emotions = list(emotions)
    layout = Layout([HookPoint("lm", k, width, f"lm.{k}") for k in range(lm_layers)]
                    + [HookPoint("synth", k, width, f"synth.{k}") for k in range(synth_layers)])
    n, e_n = layout.n_neurons, len(emotions)
    picks = rng.permutation(n)
    planted = {e: np.sort(picks[k * n_planted:(k + 1) * n_planted]) for k, e in enumerate(emotions)}
    at = e_n * n_planted
    always_on = np.sort(picks[at:at + n_always_on])
    at += n_always_on
    suppressed = {e: np.sort(picks[at + k * n_suppressed:at + (k + 1) * n_suppressed]) for k, e in enumerate(emotions)}

    base = rng.uniform(0.02, 0.35, n)
    base[always_on] = rng.uniform(0.90, 0.98, always_on.size)
    p = np.tile(base, (e_n, 1))  # [E, N] probability under each true emotion
    for k, e in enumerate(emotions):
        p[k, planted[e]] += boost
        high = rng.uniform(0.6, 0.8, n_suppressed)
        p[:, suppressed[e]] = high
        p[k, suppressed[e]] = high - 0.3

    records, counts, tokens, labels = [], [], [], {}
    for k, e in enumerate(emotions):
        for j in range(successes[k] + failures):
            aid = f"{e}-{j:03d}"
            transcript = " ".join(rng.choice(_WORDS, size=8))
            kind = "ok" if j < successes[k] else ("judge" if j % 2 else "wer")
            other = (k + 1 + int(rng.integers(e_n - 1))) % e_n  # a failure sounds like another emotion
            shown = k if kind == "ok" else other
            labels[aid] = emotions[other] if kind == "judge" else e
            text = " ".join(transcript.split()[:4]) if kind == "wer" else transcript
            t = np.repeat([rng.integers(40, 120), rng.integers(100, 300)], [lm_layers, synth_layers])
            prob = np.clip(p[shown] + rng.normal(0, 0.03), 0, 1)
            counts.append(rng.binomial(np.repeat(t, width), prob))
            tokens.append(t)
            records.append(AttemptRecord(aid, e, transcript, text, {"kind": kind}))
    return TestBed(layout, emotions, records, np.array(counts, np.int64), np.array(tokens, np.int64), labels,
                   planted, always_on, suppressed)


def recall(selected: Mapping[str, np.ndarray], planted: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per emotion, the share of its planted neurons that were selected."""
    return {e: np.intersect1d(selected[e], planted[e]).size / planted[e].size for e in planted}


def selector_recall(
    bed: TestBed,
    store: AttemptStore,
    *,
    methods: Sequence[str] = SELECTORS,
    labels: Mapping[str, str] | None = None,
    tau_wer: float = TAU_WER,
    cap: int | None = None,
    seed: int = 0,
    registry: Registry | None = None,
) -> dict[str, dict[str, float]]:
    """Filter the stored attempts (``labels`` default: the bed's judge), aggregate, run each selector at
    ``bed.rate`` and return ``{method: {emotion: recall of the planted set}}``."""
    result = filter_attempts(store.records(), bed.labels if labels is None else labels,
                             tau_wer=tau_wer, cap=cap, seed=seed, emotions=bed.emotions)
    probs = aggregate(store, result.success).probs()
    return {
        m: recall(select_neurons(probs, m, bed.rate, emotions=bed.emotions, seed=seed, registry=registry),
                  bed.planted)
        for m in methods
    }
