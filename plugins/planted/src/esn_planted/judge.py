"""``PlantedJudge``: an emotion judge that hears what the planted model can express: pitch relative to the
speaker. Each voiced 40 ms frame votes for the emotion whose pitch factor is closest to (frame f0 / the
source's f0); the label is the majority. Without a source it compares with ``REFERENCE_F0``.

It reads the planted model's sound the way a speech-emotion model reads speech: from the waveform alone
(and the source, as EVC judges get it). It also labels the synthetic ESD corpus, whose emotions differ in
pitch by the same factors, so ``esn judge-eval`` measures it like the paper's judge (section 4.1).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from esn.errors import EsnError
from esn.judges import Audio, Judge, Judgement

from esn_planted import sound


class PlantedJudge(Judge):
    """Votes of the voiced frames for the emotion whose pitch factor fits best (see the module docstring)."""

    name = "planted"
    kind = "emotion"

    @classmethod
    def load(cls, source: str | None = None, *, device: str = "cpu", **options) -> PlantedJudge:
        if options:
            raise EsnError(f"judge 'planted' takes no options, got {sorted(options)}")
        return cls()

    def judge(self, audios: Sequence[Audio], *, sources: Sequence[Audio] | None = None) -> list[Judgement]:
        from esn.audio import resample

        if sources is not None and len(sources) != len(audios):
            raise EsnError(f"{len(audios)} clips but {len(sources)} sources")
        out = []
        for k, a in enumerate(audios):
            wave = resample(a.samples, a.sample_rate, sound.RATE)
            ref = None
            if sources is not None:
                ref = sound.source_pitch(resample(sources[k].samples, sources[k].sample_rate, sound.RATE))
            ref = ref or sound.REFERENCE_F0
            votes = Counter(sound.nearest_emotion(f0 / ref) for f0 in sound.frame_pitches(wave))
            if not votes:
                out.append(Judgement(None, {}, "no voiced frame"))
                continue
            total = sum(votes.values())
            label = max(votes, key=lambda e: (votes[e], -list(sound.FACTOR).index(e)))
            out.append(Judgement(label, {e: votes[e] / total for e in sound.FACTOR}, f"{total} voiced frames"))
        return out
