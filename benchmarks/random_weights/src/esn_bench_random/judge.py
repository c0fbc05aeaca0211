"""A stand-in emotion judge for throughput runs: labels by zero-crossing rate. Meaningless, cheap (numpy)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from esn.emotions import EMOTIONS
from esn.judges import Audio, Judge, Judgement


class StandInJudge(Judge):
    name = "stand_in"

    @classmethod
    def load(cls, source=None, *, device="cpu", **options) -> StandInJudge:
        return cls()

    def judge(self, audios: Sequence[Audio], *, sources: Sequence[Audio] | None = None) -> list[Judgement]:
        out = []
        for a in audios:
            x = np.asarray(a.samples, dtype=np.float32)
            zcr = float(np.mean(np.signbit(x[1:]) != np.signbit(x[:-1]))) if x.size > 1 else 0.0
            out.append(Judgement(EMOTIONS[min(int(zcr * 10), len(EMOTIONS) - 1)], {"zcr": zcr}))
        return out
