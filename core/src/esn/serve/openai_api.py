"""The OpenAI-compatible face of ``esn serve``: ``GET /v1/models`` and ``POST /v1/chat/completions``.

Any OpenAI client (the official ``openai`` package, ``curl``...) converts speech with the chat API: one user
message whose content is one ``input_audio`` part (base64 wav or mp3), ``modalities: ["text", "audio"]``,
``audio: {"voice", "format": "wav" | "pcm16"}`` and esn's controls in ``"esn": {"emotion", "mask_emotion",
"method", "alpha"}`` (the client's ``extra_body``). They become the same :class:`~esn.serve.convert.Job`
as a ``/v1/convert`` form, checked by the same :meth:`Converter.job`, and go through the same batcher:
chat rows and convert rows share batches.

Nothing is ignored: an unknown field, a text part, a system message or an option this service cannot
honour is refused with OpenAI's error JSON ``{"error": {"message", "type", "param", "code"}}``.

``stream: true`` answers server-sent events in OpenAI's ``chat.completion.chunk`` format: the role at
once, then the transcript (``delta.audio.transcript``) and the audio (``delta.audio.data``, base64 pcm16
chunks that concatenate to the whole 16-bit audio), a last chunk with ``finish_reason``, ``[DONE]``.
The adapters return a conversion whole, so the text and audio chunks leave when the row's batch is done;
until then SSE comments keep the connection checked, so a client that leaves is noticed and its row freed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import soundfile as sf
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from esn.serve.convert import Converter, Job, Outcome
from esn.serve.errors import RequestError
from esn.serve.jobs import await_outcome, submit, wav_bytes
from esn.serve.metrics import Metrics

PATHS = ("/v1/models", "/v1/chat/completions")
CHUNK_SECONDS = 0.2  # audio per streamed chunk
KEEPALIVE_S = 0.25  # SSE comment interval while a row waits: a gone client fails the write and frees its row
INPUT_FORMATS = {"wav": ("WAV", "WAVEX", "RF64"), "mp3": ("MP3",)}  # OpenAI's formats -> libsndfile's containers
OUTPUT_FORMATS = ("wav", "pcm16")
ESN_FIELDS = ("emotion", "mask_emotion", "method", "alpha")
TOP_FIELDS = ("model", "messages", "modalities", "audio", "stream", "stream_options", "esn", "n")


def owns(path: str) -> bool:
    """Whether ``path`` is answered by this module (its errors take OpenAI's shape)."""
    return path == "/v1/chat/completions" or path == "/v1/models" or path.startswith("/v1/models/")


def error_body(exc: RequestError) -> dict[str, Any]:
    """``exc`` in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = ("authentication_error" if exc.status == 401 else "rate_limit_error" if exc.status == 429
            else "server_error" if exc.status >= 500 else "invalid_request_error")
    return {"error": {"message": exc.message, "type": kind, "param": exc.field, "code": exc.code}}


def error_response(exc: RequestError) -> JSONResponse:
    """``exc`` as an OpenAI-style JSON error response, same status and headers."""
    return JSONResponse(error_body(exc), status_code=exc.status, headers=exc.headers)


def _bad(message: str, param: str | None, code: str = "invalid_value", status: int = 400) -> RequestError:
    return RequestError(status, code, message, field=param)


def _object(value: Any, param: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    """``value`` as a JSON object with only ``allowed`` keys (an unknown key is refused, never ignored)."""
    if not isinstance(value, dict):
        raise _bad(f"{param or 'the body'} must be an object, got {type(value).__name__}", param or None,
                   "invalid_type")
    for key in value:
        if key not in allowed:
            raise _bad(f"unknown parameter {param + '.' if param else ''}{key}: this service accepts "
                       f"{', '.join(allowed)}", f"{param + '.' if param else ''}{key}", "unknown_parameter")
    return value


def _string(value: Any, param: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _bad(f"{param} must be a string, got {json.dumps(value)}", param, "invalid_type")
    return value


@dataclass
class Chat:
    """A checked chat completion request, before its audio is decoded."""

    audio: bytes
    audio_format: str
    audio_param: str  # where the input audio sits, for errors: messages[i].content[j].input_audio
    with_audio: bool  # modalities include audio
    out_format: str | None  # wav / pcm16 when with_audio
    voice: str | None
    stream: bool
    include_usage: bool
    esn: dict[str, Any]


def parse_chat(body: Any, model_id: str) -> Chat:
    """Check the JSON body's shape and options; values (emotion, method, alpha, voice, audio) are checked
    by the converter next."""
    body = _object(body, "", TOP_FIELDS)
    model = _string(body.get("model"), "model")
    if model != model_id:
        raise _bad(f"the model {model!r} does not exist; this service serves {model_id!r} (GET /v1/models)",
                   "model", "model_not_found", 404)
    if body.get("n", 1) != 1 or isinstance(body.get("n"), bool):
        raise _bad("n must be 1: one conversion per request", "n", "unsupported_value")
    modalities = body.get("modalities", ["text"])
    if not isinstance(modalities, list) or sorted(map(str, modalities)) not in (["text"], ["audio", "text"]) \
            or not all(isinstance(m, str) for m in modalities):
        raise _bad(f'modalities must be ["text"] or ["text", "audio"], got {json.dumps(modalities)}', "modalities",
                   "unsupported_value")
    with_audio = "audio" in modalities
    out_format = voice = None
    if with_audio:
        if body.get("audio") is None:
            raise _bad('modalities ["text", "audio"] need "audio": {"voice": ..., "format": "wav" | "pcm16"}',
                       "audio", "missing_required_parameter")
        audio = _object(body["audio"], "audio", ("voice", "format"))
        voice = _string(audio.get("voice"), "audio.voice")
        out_format = _string(audio.get("format"), "audio.format")
        if out_format not in OUTPUT_FORMATS:
            raise _bad(f"audio.format must be one of {', '.join(OUTPUT_FORMATS)}, got {out_format!r}",
                       "audio.format", "unsupported_value")
    elif body.get("audio") is not None:
        raise _bad('"audio" needs modalities ["text", "audio"]', "audio", "unsupported_value")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad(f"stream must be true or false, got {json.dumps(stream)}", "stream", "invalid_type")
    if stream and out_format == "wav":
        raise _bad('streamed audio is pcm16: give audio.format "pcm16" with stream true', "audio.format",
                   "unsupported_value")
    include_usage = False
    if body.get("stream_options") is not None:
        if not stream:
            raise _bad("stream_options needs stream true", "stream_options", "unsupported_value")
        options = _object(body["stream_options"], "stream_options", ("include_usage",))
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise _bad("stream_options.include_usage must be true or false", "stream_options.include_usage",
                       "invalid_type")
    data, audio_format, audio_param = _input_audio(body.get("messages"))
    if body.get("esn") is None:
        raise _bad('esn\'s controls are missing: give "esn": {"emotion": ...} (the openai client\'s extra_body)',
                   "esn", "missing_required_parameter")
    controls = _object(body["esn"], "esn", ESN_FIELDS)
    for name in ("emotion", "mask_emotion", "method"):
        _string(controls.get(name), f"esn.{name}", optional=name != "emotion")
    alpha = controls.get("alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, int | float)):
        raise _bad(f"esn.alpha must be a number, got {json.dumps(alpha)}", "esn.alpha", "invalid_type")
    return Chat(data, audio_format, audio_param, with_audio, out_format, voice, stream, include_usage, controls)


def _input_audio(messages: Any) -> tuple[bytes, str, str]:
    """The one ``input_audio`` part of the one user message: (decoded bytes, format, its param path)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages", "invalid_type")
    if len(messages) != 1:
        raise _bad("give exactly one message, from the user, holding the speech to convert (the system prompt and "
                   "instruction are the service's; a conversation history is not supported)", "messages",
                   "unsupported_value")
    message = _object(messages[0], "messages[0]", ("role", "content"))
    if message.get("role") != "user":
        raise _bad(f"the message's role must be 'user', got {message.get('role')!r}", "messages[0].role",
                   "unsupported_value")
    parts = message.get("content")
    if not isinstance(parts, list) or len(parts) != 1:
        raise _bad("the user message's content must be a list of exactly one input_audio part (text parts are "
                   "not supported: the instruction is the service's, the target emotion is esn.emotion)",
                   "messages[0].content", "unsupported_value")
    param = "messages[0].content[0]"
    kind = parts[0].get("type") if isinstance(parts[0], dict) else None
    if kind != "input_audio":  # before the keys: a text part is told it is a text part
        raise _bad(f"content part type must be 'input_audio', got {kind!r} (text parts are not supported: the "
                   "instruction is the service's, the target emotion is esn.emotion)", f"{param}.type",
                   "unsupported_value")
    part = _object(parts[0], param, ("type", "input_audio"))
    given = _object(part.get("input_audio"), f"{param}.input_audio", ("data", "format"))
    fmt = _string(given.get("format"), f"{param}.input_audio.format")
    if fmt not in INPUT_FORMATS:
        raise _bad(f"input_audio.format must be one of {', '.join(INPUT_FORMATS)}, got {fmt!r}",
                   f"{param}.input_audio.format", "unsupported_value")
    text = _string(given.get("data"), f"{param}.input_audio.data")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("input_audio.data is not base64", f"{param}.input_audio.data") from None
    return data, fmt, f"{param}.input_audio"


def _moved(exc: RequestError, params: dict[str, str]) -> RequestError:
    """A converter's error with its form field renamed to where the value sits in the JSON body."""
    exc.field = params.get(exc.field or "", exc.field)
    return exc


class ChatCompletions:
    """The two endpoints over one converter; ``router()`` gives them to the app."""

    def __init__(self, converter: Converter, metrics: Metrics):
        self.converter = converter
        self.metrics = metrics
        self.model_id = converter.adapter.name
        self.created = int(time.time())

    def model(self) -> dict[str, Any]:
        """The served model as an OpenAI model object (its id is the adapter's name)."""
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "esn",
                "source": self.converter.adapter.source}

    async def job(self, chat: Chat) -> Job:
        """The chat request as a checked conversion job: the same checks as ``/v1/convert``."""
        params = {"audio": f"{chat.audio_param}.data", **{f: f"esn.{f}" for f in ESN_FIELDS}}
        try:
            wave = await run_in_threadpool(self.converter.audio, chat.audio, "input_audio")
            container = sf.info(io.BytesIO(chat.audio)).format
            if container not in INPUT_FORMATS[chat.audio_format]:
                raise _bad(f"input_audio.format says {chat.audio_format} but the data is {container.lower()}",
                           f"{chat.audio_param}.format")
            speaker = self.converter.voice(chat.voice, "audio.voice") if chat.voice is not None else None
            e = chat.esn
            job = self.converter.job(audio=wave, emotion=e["emotion"], mask_emotion=e.get("mask_emotion"),
                                     method=e.get("method"), alpha=e.get("alpha"), job_id=uuid.uuid4().hex[:12])
        except RequestError as exc:
            raise _moved(exc, params) from None
        job.speaker = speaker
        return job

    def _message(self, job: Job, chat: Chat, outcome: Outcome, created: int) -> dict[str, Any]:
        result = outcome.result
        message: dict[str, Any] = {"role": "assistant", "content": None if chat.with_audio else result.text}
        if chat.with_audio:
            wav = wav_bytes(outcome)
            data = wav if chat.out_format == "wav" else _pcm16(wav)
            message["audio"] = {"id": f"audio_{job.id}", "data": base64.b64encode(data).decode("ascii"),
                                "expires_at": created + 3600, "transcript": result.text}
        return message

    def _usage(self, outcome: Outcome) -> dict[str, int]:
        info = outcome.result.info
        prompt = int(info.get("prompt_tokens") or 0)
        completion = int(info.get("text_tokens") or 0) + int(info.get("audio_tokens") or 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _facts(self, job: Job, outcome: Outcome) -> dict[str, Any]:
        return {**job.settings, "voice": job.speaker or "default", "sample_rate": outcome.result.sample_rate,
                "batch_size": outcome.batch_size, "queue_s": round(outcome.extra.get("queue_s", 0.0), 6),
                "compute_s": round(outcome.compute_s, 6)}

    async def complete(self, request: Request):
        """``POST /v1/chat/completions``: check, queue, and answer JSON or (``stream``) server-sent events."""
        started = time.monotonic()
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; RecursionError: nesting
            raise _bad(f"the body is not JSON: {exc}", None, "invalid_json") from None
        chat = parse_chat(body, self.model_id)
        job = await self.job(chat)
        future = submit(request, job, self.metrics)  # 429 here, before any answer starts
        created = int(time.time())
        if chat.stream:
            # The background task also runs when the client left before the first event was made.
            return StreamingResponse(self._events(request, job, chat, future, started, created),
                                     media_type="text/event-stream", background=BackgroundTask(future.cancel),
                                     headers={"Cache-Control": "no-cache", "X-Esn-Request-Id": job.id})
        outcome = await await_outcome(request, job, future, started, self.metrics)
        if outcome is None:
            return JSONResponse({}, status_code=499)
        return JSONResponse({
            "id": f"chatcmpl-{job.id}", "object": "chat.completion", "created": created, "model": self.model_id,
            "choices": [{"index": 0, "message": self._message(job, chat, outcome, created), "finish_reason": "stop",
                         "logprobs": None}],
            "usage": self._usage(outcome), "esn": self._facts(job, outcome),
        })

    async def _events(self, request: Request, job: Job, chat: Chat, future: asyncio.Future, started: float,
                      created: int) -> AsyncIterator[str]:
        head = {"id": f"chatcmpl-{job.id}", "object": "chat.completion.chunk", "created": created,
                "model": self.model_id}

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            event = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                     **extra}
            return f"data: {json.dumps(event)}\n\n"

        waiting = asyncio.ensure_future(await_outcome(request, job, future, started, self.metrics,
                                                      watch_disconnect=False))
        try:
            yield chunk({"role": "assistant", "content": None if chat.with_audio else ""})
            while not waiting.done():  # a write to a gone client fails: the response is cancelled, so is the row
                await asyncio.wait({waiting}, timeout=KEEPALIVE_S)
                if not waiting.done():
                    yield ": waiting for the batch\n\n"
            try:
                outcome = waiting.result()
            except RequestError as exc:  # the stream has begun: the error is an event (the openai client raises it)
                yield f"data: {json.dumps(error_body(exc))}\n\n"
                return
            result = outcome.result
            if chat.with_audio:
                yield chunk({"audio": {"id": f"audio_{job.id}", "transcript": result.text}})
                pcm = _pcm16(wav_bytes(outcome))
                step = 2 * max(1, int(CHUNK_SECONDS * result.sample_rate))
                for at in range(0, len(pcm), step):
                    yield chunk({"audio": {"data": base64.b64encode(pcm[at:at + step]).decode("ascii")}})
                yield chunk({"audio": {"expires_at": created + 3600}})
            else:
                yield chunk({"content": result.text})
            yield chunk({}, "stop", esn=self._facts(job, outcome))
            if chat.include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': self._usage(outcome)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not waiting.done():  # the client left before its answer
                waiting.cancel()  # cancels the row's future too: the batcher skips it or drops its answer
                self.metrics.conversions.labels("disconnected").inc()

    def router(self) -> APIRouter:
        """The routes ``/v1/models``, ``/v1/models/{id}`` and ``/v1/chat/completions``, for ``include_router``."""
        router = APIRouter()
        router.add_api_route("/v1/models", lambda: {"object": "list", "data": [self.model()]}, methods=["GET"],
                             summary="the model this service serves (OpenAI's models list)")

        def one(model_id: str) -> dict[str, Any]:
            if model_id != self.model_id:
                raise _bad(f"the model {model_id!r} does not exist; this service serves {self.model_id!r}", "model",
                           "model_not_found", 404)
            return self.model()

        router.add_api_route("/v1/models/{model_id}", one, methods=["GET"], summary="one model")
        router.add_api_route("/v1/chat/completions", self.complete, methods=["POST"],
                             summary="convert speech through OpenAI's chat completions API (stream or not)")
        return router


def _pcm16(wav: bytes) -> bytes:
    """The 16-bit samples of a wav file, little-endian: the same numbers ``esn convert`` writes."""
    return sf.read(io.BytesIO(wav), dtype="int16")[0].astype("<i2").tobytes()
