"""The judge interface: a speech-emotion judge labels converted speech with one of the five emotions."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from esn.emotions import EMOTIONS


@dataclass
class Judgement:
    """One judged utterance. ``label`` is None when the judge gave no usable answer (never guessed)."""

    label: str | None
    scores: dict[str, float] = field(default_factory=dict)  # per-class scores, judge's own classes
    raw: str = ""  # the judge's raw answer, for LALM judges


@dataclass
class Audio:
    """A waveform with its rate: what judges score. ``samples`` is float32 ``[n]`` (mono)."""

    samples: np.ndarray
    sample_rate: int
    name: str = ""


class Judge(abc.ABC):
    """Scores speech for emotion (or naturalness). Registered through the ``register_judges`` hook."""

    name: ClassVar[str]
    kind: ClassVar[str] = "emotion"  # "emotion" (labels) or "quality" (a MOS-like score in scores["mos"])
    labels: ClassVar[tuple[str, ...]] = EMOTIONS

    @classmethod
    @abc.abstractmethod
    def load(cls, source: str | None = None, *, device: str = "cpu", **options) -> Judge:
        """Load the judge's model from a local directory, a hub id, or its default."""

    @abc.abstractmethod
    def judge(self, audios: Sequence[Audio], *, sources: Sequence[Audio] | None = None) -> list[Judgement]:
        """Judge each audio (batched); ``sources`` are the unconverted inputs, for judges that compare."""
