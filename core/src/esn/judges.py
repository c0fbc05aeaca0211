"""The judge interface: a speech-emotion judge labels converted speech with one of the five emotions."""

from __future__ import annotations

import abc
import inspect
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from esn.emotions import EMOTIONS
from esn.errors import EsnError


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


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

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Refuse bad ``load`` options before anything is loaded (a run checks them before its first stage).

        The default reads ``load``'s signature: every option must be one of its keyword-only parameters
        (``device`` aside), and a value must have the parameter's annotated type exactly (``"yes"`` is not
        a bool, ``"4"`` not an int). A judge whose ``load`` passes arbitrary ``**options`` on, or whose
        options have ranges, overrides this (calling ``super().check_options`` first where it fits).
        """
        params = {n: p for n, p in inspect.signature(cls.load).parameters.items()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY and n != "device"}
        unknown = sorted(set(options) - set(params))
        if unknown:
            raise EsnError(f"judge {cls.name!r}: unknown option(s) {', '.join(unknown)} "
                           f"(known: {', '.join(params) or 'none'})")
        import pydantic  # here, not at the top: listing plugins imports this module

        try:
            hints = typing.get_type_hints(cls.load)
        except Exception:  # an annotation that does not resolve: leave the values to load()
            return
        for key, value in options.items():
            if key not in hints:
                continue
            try:
                pydantic.TypeAdapter(hints[key]).validate_python(value, strict=True)
            except pydantic.ValidationError:
                raise EsnError(f"judge {cls.name!r}: option {key} = {value!r} must be of type "
                               f"{_type_name(hints[key])}") from None

    @abc.abstractmethod
    def judge(self, audios: Sequence[Audio], *, sources: Sequence[Audio] | None = None) -> list[Judgement]:
        """Judge each audio (batched); ``sources`` are the unconverted inputs, for judges that compare."""
