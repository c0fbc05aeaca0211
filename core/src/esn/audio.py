"""Reading, checking and resampling speech. Every model and judge takes float32 mono at a fixed rate."""

from __future__ import annotations

import errno
import math
import os
import stat
from pathlib import Path

import numpy as np
import soundfile as sf

from esn.errors import EsnError
from esn.files import os_error

MODEL_RATE = 16_000  # what the LALMs' audio encoders take
# Accepted sample rates: below 8 kHz speech cannot be judged; above 384 kHz no audio interface records
# (a rate is only a header field, so anything else is refused before any work).
MIN_RATE, MAX_RATE = 8_000, 384_000
MAX_SECONDS = 60.0  # longer input is refused: EVC prompts are single utterances
TARGET_DBFS = -23.0  # RMS level (re full scale) of listening-kit clips
PEAK_DBFS = -1.0  # the peak a normalised clip may reach


def audio_file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as a sound file (missing, a symbolic link loop, a folder...), or None."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if path.is_symlink():
            return f"audio file {path} is a symbolic link to a file that does not exist"
        return f"audio file not found: {path}"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return (f"audio file {path} is a symbolic link loop (following its links leads back to itself): "
                    "point it at a sound file")
        return str(os_error(exc, path, "read audio file"))
    if not stat.S_ISREG(st.st_mode):
        return f"audio file {path} is {'a folder' if stat.S_ISDIR(st.st_mode) else 'not a regular file'}"
    return None


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a sound file as float32 ``[samples, channels]`` and its rate; clear errors for bad files."""
    path = Path(path)
    problem = audio_file_problem(path)
    if problem is not None:
        raise EsnError(problem)
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


def check_rate(rate: int, what: str = "audio") -> int:
    """``rate`` as an int if it lies in ``[MIN_RATE, MAX_RATE]`` Hz; one clear EsnError line otherwise.

    The range is refused from the header alone, before a sample is decoded or a filter is built."""
    accepted = f"accepted: {MIN_RATE}-{MAX_RATE} Hz"
    if isinstance(rate, float) and rate.is_integer():
        rate = int(rate)
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)):
        raise EsnError(f"{what}: sample rate {rate!r} is not a whole number of Hz ({accepted})")
    if rate < MIN_RATE:
        raise EsnError(f"{what}: sample rate {rate} Hz is below 8 kHz, where speech cannot be judged ({accepted})")
    if rate > MAX_RATE:
        raise EsnError(f"{what}: sample rate {rate} Hz is outside the accepted range ({accepted})")
    return int(rate)


def resample(wave: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling of a mono float32 waveform (libsoxr, "HQ" quality).

    libsoxr filters in a stream with a filter sized by the ratio's quality, not by the rates' common
    factors, so time and memory grow with the audio's length only (see benchmarks/bench_resample.py);
    it keeps no state between calls. Both rates must lie in ``[MIN_RATE, MAX_RATE]`` Hz.
    Returns ``ceil(len * new_rate / orig_rate)`` samples."""
    import soxr

    orig_rate, new_rate = check_rate(orig_rate, "resample input"), check_rate(new_rate, "resample output")
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise EsnError(f"resample takes mono audio [samples], got shape {wave.shape}")
    if orig_rate == new_rate:
        return wave
    out = soxr.resample(wave, orig_rate, new_rate, quality="HQ")
    n_out = math.ceil(new_rate * wave.shape[0] / orig_rate)
    if out.shape[0] < n_out:  # libsoxr rounds the length to nearest: pad the last partial sample
        out = np.pad(out, (0, n_out - out.shape[0]))
    return np.asarray(out[:n_out], dtype=np.float32)


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
    sample_rate = check_rate(sample_rate, label)
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
    return resample(wave, sample_rate, target_rate)


def write_audio(path: str | Path, wave: np.ndarray, sample_rate: int) -> Path:
    """Write a mono float32 waveform as 16-bit PCM (wav, or what the suffix says), making parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.asarray(wave, dtype=np.float32), sample_rate, subtype="PCM_16")
    return path
