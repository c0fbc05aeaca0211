"""Reading, checking and resampling speech. Every model and judge takes float32 mono at a fixed rate."""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf

from esn.errors import EsnError

if TYPE_CHECKING:  # imported where needed: judges import this module from their (cheap) plugin entry points
    import torch

MODEL_RATE = 16_000  # what the LALMs' audio encoders take
MAX_SECONDS = 60.0  # longer input is refused: EVC prompts are single utterances
TARGET_DBFS = -23.0  # RMS level (re full scale) of listening-kit clips
PEAK_DBFS = -1.0  # the peak a normalised clip may reach


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a sound file as float32 ``[samples, channels]`` and its rate; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise EsnError(f"audio file not found: {path}")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise EsnError(f"cannot read audio file {path}: {exc}") from None
    return data, int(rate)


def to_mono(data: np.ndarray) -> np.ndarray:
    """``[samples]`` or ``[samples, channels]`` -> ``[samples]`` (channel mean)."""
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        data = data.mean(axis=1)
    if data.ndim != 1:
        raise EsnError(f"audio must be [samples] or [samples, channels], got shape {data.shape}")
    return data


@lru_cache(maxsize=32)
def _sinc_kernel(orig: int, new: int, width: int = 16, beta: float = 8.0) -> tuple[torch.Tensor, int]:
    """Kaiser-windowed sinc polyphase filters ``[new, 1, taps]`` for rate ``orig`` -> ``new`` (reduced)."""
    import torch

    cutoff = min(orig, new) * 0.97  # a little below Nyquist of the slower rate
    pad = math.ceil(width * orig / cutoff)
    t = torch.arange(-pad, pad + orig, dtype=torch.float64)[None, :] / orig
    t = t - torch.arange(0, -new, -1, dtype=torch.float64)[:, None] / new
    t = t * cutoff
    t = t.clamp(-width, width)
    window = torch.special.i0(beta * torch.sqrt(1 - (t / width) ** 2)) / torch.special.i0(torch.tensor(beta))
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(math.pi * t) / (math.pi * t))
    kernel = kernel * window * cutoff / orig
    return kernel[:, None, :].to(torch.float32), pad


def resample(wave: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling of a mono float32 waveform."""
    if orig_rate <= 0 or new_rate <= 0:
        raise EsnError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
    if orig_rate == new_rate:
        return np.asarray(wave, dtype=np.float32)
    import torch

    g = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // g, new_rate // g
    kernel, pad = _sinc_kernel(orig, new)
    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))[None, None, :]
    x = torch.nn.functional.pad(x, (pad, pad + orig))
    y = torch.nn.functional.conv1d(x, kernel, stride=orig)  # [1, new, frames]
    y = y.transpose(1, 2).reshape(-1)
    n_out = math.ceil(new * wave.shape[0] / orig)
    return y[:n_out].numpy().astype(np.float32)


def rms_normalize(wave: np.ndarray, dbfs: float = TARGET_DBFS, peak_dbfs: float = PEAK_DBFS) -> np.ndarray:
    """Scale to an RMS of ``dbfs`` (re full scale 1.0), then down if the peak would pass ``peak_dbfs``."""
    wave = np.asarray(wave, dtype=np.float64)
    rms = float(np.sqrt(np.mean(wave**2))) if wave.size else 0.0
    if rms == 0.0:
        return wave.astype(np.float32)
    out = wave * (10 ** (dbfs / 20) / rms)
    peak = float(np.max(np.abs(out)))
    limit = 10 ** (peak_dbfs / 20)
    if peak > limit:
        out *= limit / peak
    return out.astype(np.float32)


def prepare_audio(
    source: str | Path | np.ndarray,
    sample_rate: int | None = None,
    *,
    target_rate: int = MODEL_RATE,
    max_seconds: float = MAX_SECONDS,
    name: str = "",
) -> np.ndarray:
    """Any file or array, any rate, any channel count -> float32 mono at ``target_rate``, checked.

    Refuses empty audio, non-finite samples, silence (all samples below 1e-6) and audio longer
    than ``max_seconds``; clips nothing, converts stereo by channel mean.
    """
    if isinstance(source, (str, Path)):
        data, sample_rate = read_audio(source)
        name = name or str(source)
    else:
        data = np.asarray(source)
        if sample_rate is None:
            raise EsnError(f"audio {name or 'array'}: a sample rate is needed with array input")
    label = name or "audio"
    if data.size == 0:
        raise EsnError(f"{label}: audio is empty")
    wave = to_mono(data)
    if not np.all(np.isfinite(wave)):
        raise EsnError(f"{label}: audio contains NaN or infinite samples")
    seconds = wave.shape[0] / sample_rate
    if seconds > max_seconds:
        raise EsnError(f"{label}: audio is {seconds:.1f} s long; at most {max_seconds:.0f} s is accepted")
    if float(np.max(np.abs(wave))) < 1e-6:
        raise EsnError(f"{label}: audio is silent (peak below 1e-6)")
    if sample_rate < 8_000:
        raise EsnError(f"{label}: sample rate {sample_rate} Hz is below 8 kHz; speech cannot be judged")
    return resample(wave, sample_rate, target_rate)


def write_audio(path: str | Path, wave: np.ndarray, sample_rate: int) -> Path:
    """Write a mono float32 waveform as 16-bit PCM (wav, or what the suffix says), making parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.asarray(wave, dtype=np.float32), sample_rate, subtype="PCM_16")
    return path
