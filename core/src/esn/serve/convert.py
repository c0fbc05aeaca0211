"""One conversion request, checked, and many of them as one batched generate (no HTTP in here).

A request names a target ``emotion`` and, optionally, which emotion's mask to steer with
(``mask_emotion``, default: the target), the intervention (``method``, default ``steer`` when a mask is
available, else ``none``) and its strength (``alpha``). Masks come from the mask file the service was
started with, or from a mask file uploaded with the request. Every mistake is a :class:`RequestError`
with an HTTP status, a short machine-readable code and a one-line message.

:meth:`Converter.run` turns a list of checked jobs into ONE ``adapter.generate`` call where row ``b``
carries job ``b``'s condition (``esn.steering.steer_rows``): the same path as ``esn convert``, so each
answer equals the solo conversion of the same input (bit for bit alone, within float rounding in a
padded batch).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from esn.adapters import EVCRequest, EVCResult, GenerationConfig, ModelAdapter
from esn.artifacts import MaskSet, load_masks
from esn.audio import check_rate, prepare_audio
from esn.emotions import EMOTIONS, normalize_emotion
from esn.errors import EsnError, LayoutMismatchError
from esn.interventions import get_intervention
from esn.serve.errors import RequestError
from esn.steering import Condition, check_mask, steer_rows

NO_STEERING = "none"  # method value for a plain (unsteered) conversion


@dataclass(frozen=True)
class Limits:
    """What the service accepts and how it batches (``esn serve --help`` has one flag per field)."""

    max_batch: int = 16  # rows per batched generate
    max_wait_ms: float = 50.0  # how long the first request of a batch waits for company
    queue_size: int = 64  # requests waiting for a batch; one more gets 429
    timeout_s: float = 300.0  # per request, from arrival to answer; a request may ask for less
    max_upload_mb: float = 20.0  # whole request body
    max_seconds: float = 30.0  # input speech
    max_alpha: float = 10.0  # |alpha| accepted

    def __post_init__(self) -> None:
        for name in ("max_batch", "queue_size"):
            if getattr(self, name) < 1:
                raise EsnError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.max_wait_ms < math.inf:
            raise EsnError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        for name in ("timeout_s", "max_upload_mb", "max_seconds", "max_alpha"):
            if not 0 < getattr(self, name) < math.inf:
                raise EsnError(f"{name} must be a positive number, got {getattr(self, name)}")

    @property
    def max_upload_bytes(self) -> int:
        """``max_upload_mb`` in bytes."""
        return int(self.max_upload_mb * 1024 * 1024)


@dataclass
class Job:
    """One checked request: 16 kHz mono speech, the target emotion and the row's steering condition."""

    id: str
    audio: np.ndarray  # float32 [samples] at 16 kHz
    emotion: str
    condition: Condition | None
    settings: dict[str, Any]  # what the client asked for, echoed in the answer
    timeout_s: float
    speaker: str | None = None  # the output voice; None: the service's (``GenerationConfig.speaker``)


@dataclass
class Outcome:
    """What became of one job: a result or an error, and how it was computed."""

    result: EVCResult | None = None
    error: RequestError | None = None
    batch_size: int = 0
    compute_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Converter:
    """The loaded model, the service's masks and settings; checks requests and runs batches."""

    def __init__(self, adapter: ModelAdapter, config: GenerationConfig, limits: Limits,
                 masks: MaskSet | None = None):
        self.adapter = adapter
        self.config = config
        self.limits = limits
        self.masks = masks
        if masks is not None:  # a mask set made for another model fails here, before serving
            for emotion, mask in masks.masks.items():
                check_mask(adapter, mask, f"mask {emotion!r}")
        # Adapters that run one conversation at a time cannot give rows different conditions.
        self.max_batch = limits.max_batch if adapter.batched else 1
        self._uploaded: OrderedDict[str, MaskSet] = OrderedDict()  # by content hash, a few kept
        self._lock = threading.Lock()

    # -- checking a request (any thread) ---------------------------------------------------------------

    def audio(self, data: bytes, name: str = "audio") -> np.ndarray:
        """Uploaded sound file bytes (any rate, channels, libsndfile format) -> float32 mono 16 kHz."""
        if not data:
            raise RequestError(422, "bad_audio", f"{name}: the file is empty", field="audio")
        try:
            with sf.SoundFile(io.BytesIO(data)) as f:
                rate, frames = f.samplerate, f.frames
                try:  # from the header, before decoding: a rate is all a bomb needs
                    check_rate(rate, name)
                except EsnError as exc:
                    raise RequestError(422, "bad_audio", str(exc), field="audio") from None
                seconds = frames / rate if rate else 0.0
                if seconds > self.limits.max_seconds:  # refused before decoding it
                    raise RequestError(413, "audio_too_long", f"{name}: {seconds:.1f} s of audio; this service "
                                       f"accepts at most {self.limits.max_seconds:g} s", field="audio")
                wave = f.read(dtype="float32", always_2d=True)
        except RequestError:
            raise
        except Exception as exc:  # soundfile: LibsndfileError, RuntimeError, TypeError...
            raise RequestError(415, "not_audio", f"{name}: not a sound file libsndfile can read "
                               f"(wav, flac, ogg, mp3, ...): {exc}", field="audio") from None
        try:
            return prepare_audio(wave, rate, max_seconds=self.limits.max_seconds, name=name)
        except EsnError as exc:
            raise RequestError(422, "bad_audio", str(exc), field="audio") from None

    def uploaded_masks(self, data: bytes) -> MaskSet:
        """A mask file sent with the request (safetensors; nothing is unpickled), checked on use."""
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            if digest in self._uploaded:
                self._uploaded.move_to_end(digest)
                return self._uploaded[digest]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "mask.safetensors"
            path.write_bytes(data)
            try:
                masks = load_masks(path)
            except EsnError as exc:
                message = str(exc).replace(str(path), "uploaded mask")
                raise RequestError(422, "bad_mask", message, field="mask") from None
        # The same Mask objects for the same file: rows that share them share one steering item.
        with self._lock:
            self._uploaded[digest] = masks
            while len(self._uploaded) > 16:
                self._uploaded.popitem(last=False)
        return masks

    def job(self, *, audio: np.ndarray, emotion: str, mask_emotion: str | None = None, method: str | None = None,
            alpha: str | float | None = None, masks: MaskSet | None = None, timeout: str | float | None = None,
            job_id: str = "") -> Job:
        """Check what the client asked for; ``masks`` (uploaded) take the place of the service's set."""
        try:
            emotion = normalize_emotion(emotion, EMOTIONS)
        except EsnError as exc:
            raise RequestError(422, "unknown_emotion", str(exc), field="emotion") from None
        masks = masks if masks is not None else self.masks
        method = (method or "").strip() or (NO_STEERING if masks is None else "steer")
        value = self._number(alpha, "alpha", "bad_alpha")
        wait = self._number(timeout, "timeout", "bad_timeout")
        if wait is not None and not 0 < wait <= self.limits.timeout_s:
            raise RequestError(422, "bad_timeout", f"timeout must be in (0, {self.limits.timeout_s:g}] s, got {wait:g}",
                               field="timeout")
        settings: dict[str, Any] = {"emotion": emotion, "method": method, "mask_emotion": None, "alpha": None}
        if method == NO_STEERING:
            if mask_emotion or value is not None:
                raise RequestError(422, "bad_request", "mask_emotion and alpha need a method other than 'none'",
                                   field="method")
            return Job(job_id, audio, emotion, None, settings, wait or self.limits.timeout_s)
        try:
            cls = get_intervention(method)
        except EsnError as exc:
            raise RequestError(422, "unknown_method", f"{exc}; or '{NO_STEERING}' for no steering",
                               field="method") from None
        if value is not None and abs(value) > self.limits.max_alpha:
            raise RequestError(422, "alpha_out_of_range", f"alpha {value:g} is outside this service's range "
                               f"[-{self.limits.max_alpha:g}, {self.limits.max_alpha:g}]", field="alpha")
        try:
            value = cls.check_alpha(value)
        except EsnError as exc:
            raise RequestError(422, "alpha_out_of_range", str(exc), field="alpha") from None
        if masks is None:
            raise RequestError(422, "no_masks", f"method {method!r} needs a mask: this service was started without "
                               "--masks; upload one as the 'mask' field, or use method=none", field="method")
        try:
            which = normalize_emotion(mask_emotion or emotion, EMOTIONS)
        except EsnError as exc:
            raise RequestError(422, "unknown_emotion", str(exc), field="mask_emotion") from None
        if which not in masks.masks:
            hint = "" if mask_emotion else "; give mask_emotion, or method=none for no steering"
            raise RequestError(422, "unknown_mask", f"no mask for emotion {which!r} (masks for: "
                               f"{', '.join(masks.masks)}){hint}", field="mask_emotion")
        mask = masks[which]
        if masks is not self.masks:  # the service's own were checked at start-up
            try:
                check_mask(self.adapter, mask, f"the mask for {which!r}")
            except LayoutMismatchError as exc:
                raise RequestError(422, "mask_mismatch", str(exc), field="mask") from None
            except EsnError as exc:
                raise RequestError(422, "bad_mask", str(exc), field="mask") from None
        settings |= {"mask_emotion": which, "alpha": value}
        return Job(job_id, audio, emotion, Condition(mask, cls.name, value), settings,
                   wait or self.limits.timeout_s)

    def voice(self, name: str, field: str = "voice") -> str | None:
        """A requested output voice: one of the adapter's ``speakers`` (case as the adapter spells it), or
        ``default`` (None: the service's voice)."""
        voices = list(getattr(self.adapter, "speakers", None) or [])
        if name.strip().lower() == "default":
            return None
        for voice in voices:
            if voice.lower() == name.strip().lower():
                return voice
        raise RequestError(422, "unknown_voice", f"voice {name!r} is not one of {self.adapter.name}'s voices: "
                           f"{', '.join([*voices, 'default'])}", field=field)

    @staticmethod
    def _number(text: str | float | None, name: str, code: str) -> float | None:
        if text is None or (isinstance(text, str) and not text.strip()):
            return None
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise RequestError(422, code, f"{name} must be a number, got {text!r}", field=name) from None
        if not math.isfinite(value):
            raise RequestError(422, code, f"{name} must be finite, got {text!r}", field=name)
        return value

    # -- running a batch (the model thread only) -------------------------------------------------------

    def run(self, jobs: list[Job]) -> list[Outcome]:
        """One batched generate for ``jobs`` (one per output voice); if it fails, each job alone, so one bad
        row fails only itself."""
        voices: dict[str | None, list[int]] = {}
        for i, job in enumerate(jobs):
            voices.setdefault(job.speaker, []).append(i)
        if len(voices) > 1:  # a generate speaks with one voice
            outcomes: list[Outcome] = [None] * len(jobs)  # type: ignore[list-item]
            for rows in voices.values():
                for i, outcome in zip(rows, self.run([jobs[i] for i in rows]), strict=True):
                    outcomes[i] = outcome
            return outcomes
        t0 = time.perf_counter()
        try:
            results = self._generate(jobs)
        except Exception as exc:
            if len(jobs) > 1:  # e.g. an adapter limit one input breaks: isolate it
                return [self.run([job])[0] for job in jobs]
            return [Outcome(error=_failure(exc), batch_size=1, compute_s=time.perf_counter() - t0)]
        elapsed = time.perf_counter() - t0
        outcomes = []
        for result in results:
            if result.waveform.size == 0:
                error = RequestError(422, "no_speech", f"the model produced no speech (decoded text: {result.text!r})")
                outcomes.append(Outcome(error=error, batch_size=len(jobs), compute_s=elapsed))
            else:
                outcomes.append(Outcome(result=result, batch_size=len(jobs), compute_s=elapsed))
        return outcomes

    def _generate(self, jobs: list[Job]) -> list[EVCResult]:
        requests = [EVCRequest(audio=j.audio, emotion=j.emotion, id=j.id) for j in jobs]
        conditions = [j.condition for j in jobs]
        steering = steer_rows(self.adapter, conditions) if any(conditions) else contextlib.nullcontext()
        speaker = jobs[0].speaker
        config = self.config if speaker is None else self.config.model_copy(update={"speaker": speaker})
        with steering:
            results = self.adapter.generate(requests, config)
        if len(results) != len(jobs):
            raise EsnError(f"{self.adapter.name} returned {len(results)} results for {len(jobs)} requests")
        return results


def _failure(exc: Exception) -> RequestError:
    if isinstance(exc, EsnError):  # the input cannot be converted (e.g. an adapter's own limit)
        return RequestError(422, "conversion_failed", str(exc))
    return RequestError(500, "internal_error", f"conversion failed: {type(exc).__name__}: {exc}")
