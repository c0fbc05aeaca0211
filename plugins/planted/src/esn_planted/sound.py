"""The planted model's ears and voice, and what its judge listens for: pitch.

* ``audio_tokens``: the source as ``FRAMES`` tokens, each a frame's loudness and zero-crossing rate, hashed.
* ``render``: speech codes -> a voiced sound, ``SEGMENT`` seconds per code, at the source's pitch times the
  code's emotion factor (the factors of the synthetic ESD corpus: sad lower, surprise higher), louder the
  surer the model is of the code.
* ``pitch`` / ``frame_pitches``: autocorrelation f0 estimates, used by the judge.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

RATE = 16_000
SEGMENT = 0.1  # seconds of sound per speech code
FACTOR = {"neutral": 1.0, "angry": 1.15, "happy": 1.3, "sad": 0.85, "surprise": 1.45}  # as esn.pipeline.synthetic
REFERENCE_F0 = 140.0  # the voice when the source has no measurable pitch
FRAMES = 6  # audio tokens per source
_FRAME, _HOP = 640, 320  # 40 ms frames, 20 ms hop for pitch
_LOW, _HIGH = 60.0, 400.0


def audio_tokens(wave: np.ndarray, first: int, count: int = 16) -> list[int]:
    """``FRAMES`` token ids in ``first .. first + count - 1``: each frame's loudness (3 dB steps) and
    zero-crossing rate (150 Hz steps), mixed into one id: a toy audio encoder that tells sources apart."""
    out = []
    for frame in np.array_split(np.asarray(wave, dtype=np.float64), FRAMES):
        rms = float(np.sqrt(np.mean(frame**2))) if frame.size else 0.0
        level = int(np.floor(20 * np.log10(max(rms, 1e-9)) / 3))
        crossings = np.count_nonzero(np.diff(np.signbit(frame))) if frame.size > 1 else 0
        band = int(crossings / 2 / max(frame.size / RATE, 1e-9) // 150)
        out.append(first + (31 * level + 17 * band) % count)
    return out


@lru_cache(maxsize=4096)
def _tone(f0: float, code: str) -> np.ndarray:
    """One code's ``SEGMENT`` of sound: harmonics of ``f0 * FACTOR[code]`` under a smooth envelope."""
    n = int(SEGMENT * RATE)
    if code not in FACTOR:
        return np.zeros(n, dtype=np.float32)
    t = np.arange(n) / RATE
    phase = 2 * np.pi * f0 * FACTOR[code] * t
    envelope = np.sin(np.pi * np.arange(n) / n) ** 0.5
    return (0.2 * envelope * sum(np.sin(k * phase) / k for k in range(1, 5))).astype(np.float32)


def render(codes: list[str], f0: float, effort: list[float] | None = None) -> np.ndarray:
    """float32 ``[len(codes) * SEGMENT * RATE]``: each code a harmonic tone at ``f0 * FACTOR[code]`` (an
    unknown code is silence), scaled by its ``effort`` in [0, 1] (default 1) from half to full loudness."""
    f0 = round(float(f0), 2)
    effort = [1.0] * len(codes) if effort is None else effort
    parts = [_tone(f0, c) * np.float32(0.5 + 0.5 * e) for c, e in zip(codes, effort, strict=True)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def frame_pitches(wave: np.ndarray) -> list[float]:
    """f0 of every voiced 40 ms frame (20 ms hop), in Hz: the first strong autocorrelation peak in 60-400 Hz
    (not an octave below), refined by a parabola; frames whose peak is under 0.5 are unvoiced."""
    wave = np.asarray(wave, dtype=np.float64)
    if wave.size < _FRAME:
        return []
    starts = np.arange(0, wave.size - _FRAME + 1, _HOP)
    frames = wave[starts[:, None] + np.arange(_FRAME)]
    frames -= frames.mean(axis=1, keepdims=True)
    energy = np.einsum("ij,ij->i", frames, frames)
    spec = np.fft.rfft(frames, n=2 * _FRAME, axis=1)
    lo, hi = int(RATE / _HIGH), int(RATE / _LOW)
    ac = np.fft.irfft(spec * spec.conj(), axis=1)[:, lo:hi + 1]  # [frames, lags lo..hi]
    seg = ac / np.maximum(energy, 1e-12)[:, None]
    best = seg.max(axis=1)
    inner = seg[:, 1:-1]
    strong = (inner >= seg[:, :-2]) & (inner >= seg[:, 2:]) & (inner >= 0.9 * best[:, None])
    i = np.where(strong.any(axis=1), strong.argmax(axis=1) + 1, seg.argmax(axis=1))  # first strong peak
    rows = np.arange(seg.shape[0])
    a, b, c = seg[rows, np.maximum(i - 1, 0)], seg[rows, i], seg[rows, np.minimum(i + 1, seg.shape[1] - 1)]
    curve = a - 2 * b + c
    shift = np.divide(0.5 * (a - c), curve, out=np.zeros_like(curve), where=curve != 0)
    voiced = (energy > 1e-8) & (best >= 0.5)
    return (RATE / (lo + i + shift))[voiced].tolist()


def pitch(wave: np.ndarray) -> float | None:
    """The median f0 of the voiced frames, or None for a sound without pitch."""
    f0s = frame_pitches(wave)
    return float(np.median(f0s)) if f0s else None


_PITCHES: dict[bytes, float | None] = {}


def source_pitch(wave: np.ndarray) -> float | None:
    """``pitch`` of a source clip, remembered: the evaluation grid converts each source many times."""
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    key = hashlib.sha1(wave.tobytes()).digest()
    if key not in _PITCHES:
        if len(_PITCHES) > 4096:
            _PITCHES.clear()
        _PITCHES[key] = pitch(wave)
    return _PITCHES[key]


def nearest_emotion(ratio: float) -> str:
    """The emotion whose pitch factor is closest to ``ratio`` on a log scale."""
    return min(FACTOR, key=lambda e: abs(np.log(ratio / FACTOR[e])))
