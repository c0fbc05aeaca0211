"""The step record and evaluate share: build the EVC requests of a batch, derive its generation seed,
and judge the outputs (emotion labels per judge, a quality score)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from esn.pipeline.batches import derive_seed
from esn.pipeline.data import Source
from esn.pipeline.run import Run

JUDGE_RATE = 16_000  # the paper resamples every generation to 16 kHz before judging


def requests(rows: Sequence[tuple[str, Source, str]]):
    """``(attempt id, source, target emotion)`` rows -> ``EVCRequest``s."""
    from esn.adapters import EVCRequest
    from esn.audio import prepare_audio

    return [EVCRequest(audio=prepare_audio(src.path, name=str(src.path)), emotion=target, id=aid,
                       transcript=src.transcript) for aid, src, target in rows]


def generation(run: Run, stage: str, first_id: str):
    """The generation config of a batch: its seed comes from (run seed, stage, first attempt id)."""
    return run.cfg.generation.model_copy(update={"seed": derive_seed(run.cfg.seed, stage, first_id)})


def judge(run: Run, results, reqs) -> tuple[list[dict[str, str | None]], list[float | None]]:
    """Emotion labels per judge and a quality score, for each result (None where nothing can be judged)."""
    from esn.judges import Audio

    j = run.cfg.judges
    prepared = [judge_input(r.waveform, r.sample_rate, loudness_dbfs=j.loudness_dbfs, min_seconds=j.min_seconds)
                for r in results]
    keep = [i for i, w in enumerate(prepared) if w is not None]
    audios = [Audio(prepared[i], JUDGE_RATE, results[i].id) for i in keep]
    srcs = [Audio(reqs[i].audio, JUDGE_RATE, reqs[i].id) for i in keep]
    labels: list[dict[str, str | None]] = [{name: None for name in run.emotion_judges} for _ in results]
    quality: list[float | None] = [None] * len(results)
    if not keep:
        return labels, quality
    for name, jd in run.emotion_judges.items():
        for i, v in zip(keep, jd.judge(audios, sources=srcs), strict=True):
            labels[i][name] = v.label
    if run.quality_judge is not None:
        for i, v in zip(keep, run.quality_judge.judge(audios, sources=srcs), strict=True):
            mos = v.scores.get("mos")
            quality[i] = None if mos is None else round(float(mos), 6)
    return labels, quality


def judge_input(wave: np.ndarray, rate: int, *, loudness_dbfs: float | None = None,
                min_seconds: float = 0.0) -> np.ndarray | None:
    """A clip as judges get it: 16 kHz mono float32, optionally RMS-normalised and zero-padded.

    Returns None for a clip no judge can score (empty, non-finite, or silent: peak below 1e-6 after
    normalisation); such an attempt gets no label, which counts as a miss, never as a guess.
    """
    from esn.audio import resample, rms_normalize

    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if wave.size == 0 or not np.all(np.isfinite(wave)):
        return None
    wave = resample(wave, rate, JUDGE_RATE)
    if loudness_dbfs is not None:
        wave = rms_normalize(wave, loudness_dbfs)
    if float(np.max(np.abs(wave), initial=0.0)) < 1e-6:
        return None
    short = round(min_seconds * JUDGE_RATE) - wave.size
    return np.pad(wave, (0, short)) if short > 0 else wave


def audio_name(attempt_id: str) -> str:
    """``audio/<id>.wav``, the id percent-encoded (``esn.files.id_to_name``): one file per id, never shared."""
    from esn.files import id_to_name

    return "audio/" + id_to_name(attempt_id, ".wav")


def save_audio(folder: Path, attempt_id: str, result) -> dict[str, str | None]:
    """Write a result's speech to ``folder/audio/``: ``{"audio": name, "audio_sha256": digest}`` for its record
    (both None when the model produced no speech)."""
    from esn.pipeline.files import atomic_write_wav

    if not result.waveform.size:
        return {"audio": None, "audio_sha256": None}
    name = audio_name(attempt_id)
    return {"audio": name, "audio_sha256": atomic_write_wav(folder / name, result.waveform, result.sample_rate)}
