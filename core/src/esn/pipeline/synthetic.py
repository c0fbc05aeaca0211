"""A synthetic ESD-layout corpus: tiny speech-like sounds with real ESD file names and transcripts.

The sounds are harmonic tones whose pitch contour, loudness envelope (syllable-rate bursts) and noise
depend on speaker and emotion. They are not speech: they only exercise the loader, the audio path and
the pipeline, in the exact layouts real ESD copies come in.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import soundfile as sf

from esn.pipeline.data import ESD_EMOTIONS, PER_EMOTION

FOLDER = {"neutral": "Neutral", "angry": "Angry", "happy": "Happy", "sad": "Sad", "surprise": "Surprise"}
_PITCH = {"neutral": 1.0, "angry": 1.15, "happy": 1.3, "sad": 0.85, "surprise": 1.45}
_WORDS = ("the", "author", "of", "danger", "trail", "a", "boat", "went", "down", "river", "quietly", "sometimes",
          "we", "found", "green", "stones", "near", "old", "bridge", "after", "rain")


def sentence(index: int) -> str:
    """A short seeded pseudo-sentence (3-6 words) for synthetic utterance ``index``."""
    rng = np.random.default_rng(index)
    words = rng.choice(_WORDS, size=int(rng.integers(3, 7)))
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def speech_like(speaker: int, emotion: str, index: int, seconds: float, rate: int = 16_000) -> np.ndarray:
    """A deterministic voiced-sounding signal: harmonics of a gliding f0 under syllable bursts, plus noise."""
    rng = np.random.default_rng([speaker, ESD_EMOTIONS.index(emotion), index])
    t = np.arange(int(seconds * rate)) / rate
    f0 = (110 + 9 * (speaker % 10)) * _PITCH[emotion] * (1 + 0.08 * np.sin(2 * np.pi * 1.3 * t + index))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    bursts = np.clip(np.sin(2 * np.pi * (3.5 + rng.random()) * t), 0, None) ** 2
    wave = 0.25 * voiced * bursts + 0.01 * rng.standard_normal(t.size)
    return wave.astype(np.float32)


def write_esd(
    root: str | Path,
    speakers: Iterable[int] = range(11, 21),
    indices: Iterable[int] = range(1, PER_EMOTION + 1),
    *,
    emotions: Iterable[str] = ESD_EMOTIONS,
    layout: str = "flat",
    seconds: float = 0.5,
    rate: int = 16_000,
) -> Path:
    """Write ``<root>/<speaker>/<Emotion>/<speaker>_<NNNNNN>.wav`` and ``<speaker>.txt`` transcripts.

    ``layout``: ``"flat"``; ``"official"`` (``train/``, ``evaluation/``, ``test/`` under each emotion);
    ``"nested"`` (official plus an extra ``Emotion Speech Dataset/`` level). Returns the root given.
    """
    root = Path(root)
    base = root / "Emotion Speech Dataset" if layout == "nested" else root
    indices = list(indices)
    emotions = list(emotions)
    for spk in speakers:
        name = f"{spk:04d}"
        lines = []
        for e_i, emotion in enumerate(ESD_EMOTIONS):
            for index in indices:
                utt = f"{name}_{e_i * PER_EMOTION + index:06d}"
                lines.append(f"{utt}\t{sentence(index)}\t{FOLDER[emotion]}")
                if emotion not in emotions:
                    continue
                folder = base / name / FOLDER[emotion]
                if layout in ("official", "nested"):
                    folder = folder / ("train" if index <= 300 else "evaluation" if index <= 320 else "test")
                folder.mkdir(parents=True, exist_ok=True)
                sf.write(str(folder / f"{utt}.wav"), speech_like(spk, emotion, index, seconds, rate), rate,
                         subtype="PCM_16")
        (base / name).mkdir(parents=True, exist_ok=True)
        (base / name / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root
