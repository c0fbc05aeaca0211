"""The FastAPI application of ``esn serve``: endpoints, errors as JSON, auth and upload limits.

Endpoints (docs/service.md has examples):

- ``POST /v1/convert``: multipart form ``audio`` (file), ``emotion``, optional ``mask_emotion``, ``method``,
  ``alpha``, ``timeout`` and ``mask`` (a mask file, instead of the service's). Answers the converted speech
  as ``audio/wav`` (decoded text, percent-encoded UTF-8, in ``X-Esn-Text``, cut at 512 bytes: then
  ``X-Esn-Text-Truncated: true``) or, with
  ``Accept: application/json``, JSON with the text and the wav in base64.
- ``GET /v1/masks``: the service's masks, methods and alpha range.
- ``GET /v1/models``, ``POST /v1/chat/completions``: the OpenAI-compatible API (``esn.serve.openai_api``).
- ``GET /healthz``: liveness (never needs the token). ``GET /metrics``: Prometheus text format.

Every error is JSON ``{"error": code, "message": text[, "field": name]}`` with a 4xx/5xx status (in OpenAI's
shape on the OpenAI-compatible routes).
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Annotated
from urllib.parse import quote

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from esn.display import header_text
from esn.serve.batcher import Batcher
from esn.serve.convert import NO_STEERING, Converter, Job, Outcome
from esn.serve.errors import RequestError
from esn.serve.guard import Access, AccessGuard
from esn.serve.jobs import await_outcome, submit, wav_bytes
from esn.serve.metrics import Metrics

log = logging.getLogger("uvicorn.error")  # uvicorn configures this one: our lines join its log

ENDPOINTS = ("/v1/convert", "/v1/masks", "/healthz", "/metrics", "/v1/models", "/v1/chat/completions")
OPEN_PATHS = ("/healthz",)  # answer without the bearer token (load balancers, liveness probes)
_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                 413: "too_large", 415: "unsupported_media_type", 422: "bad_request", 429: "queue_full"}


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a body without Content-Length passes the limit (FastAPI passes
    HTTPExceptions raised while it reads the body through unchanged)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes")


class Guard:
    """Pure ASGI middleware, before any body is read: body size limit, request metrics (who may ask at all is
    :class:`esn.serve.guard.AccessGuard`'s, inside this one so that its refusals are counted too)."""

    def __init__(self, app, *, metrics: Metrics, max_body: int):
        self.app = app
        self.metrics = metrics
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        started = time.perf_counter()
        status = 500

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        received = 0

        async def receive_limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        try:
            length = dict(scope["headers"]).get(b"content-length", b"0") or b"0"
            if not length.isdigit():  # uvicorn's parser refuses these first; a plain ASGI server may not
                refused = RequestError(400, "bad_request", "Content-Length must be a number of bytes")
            elif int(length) > self.max_body:
                refused = RequestError(413, "too_large", f"request body of {int(length)} bytes; "
                                       f"this service accepts at most {self.max_body} bytes")
            else:
                refused = None
            if refused is not None:
                # "Connection: close": the unread body must not be taken for the next request.
                refused.headers["Connection"] = "close"
                await refused.response()(scope, receive, send_counted)
            else:
                await self.app(scope, receive_limited, send_counted)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


def _answer(request: Request, job: Job, outcome: Outcome) -> Response:
    result = outcome.result
    facts = {"id": job.id, **job.settings, "batch_size": outcome.batch_size,
             "queue_s": round(outcome.extra.get("queue_s", 0.0), 6), "compute_s": round(outcome.compute_s, 6)}
    accept = request.headers.get("accept", "")
    if "application/json" in accept and "audio/" not in accept:
        return JSONResponse({
            **facts, "text": result.text, "sample_rate": result.sample_rate,
            "seconds": round(result.waveform.size / result.sample_rate, 6),
            "text_tokens": result.info.get("text_tokens"), "audio_tokens": result.info.get("audio_tokens"),
            "audio_wav_base64": base64.b64encode(wav_bytes(outcome)).decode("ascii"),
        })
    text, cut = header_text(result.text)  # bounded: the whole text is in the JSON answer
    headers = {"X-Esn-Text": text, "X-Esn-Text-Truncated": "true" if cut else "false", "X-Esn-Request-Id": job.id,
               "X-Esn-Batch-Size": str(outcome.batch_size),
               "X-Esn-Settings": quote(",".join(f"{k}={v}" for k, v in job.settings.items()), safe="=,")}
    return Response(wav_bytes(outcome), media_type="audio/wav", headers=headers)


def create_app(converter: Converter, *, token: str | None = None, access: Access | None = None) -> FastAPI:
    """The application; its lifespan starts the batcher and, on shutdown, lets it finish what is queued.

    ``access``: who may ask (Host names, origins, token; default: loopback names and ``token``)."""
    access = access or Access.for_address("127.0.0.1", token=token)
    limits = converter.limits
    metrics = Metrics(converter.max_batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.batcher = Batcher(converter.run, max_batch=converter.max_batch,
                                    max_wait_s=limits.max_wait_ms / 1000, queue_size=limits.queue_size,
                                    metrics=metrics)
        app.state.batcher.start()
        try:
            yield
        finally:  # uvicorn has already waited for the requests in flight; nothing queued is dropped
            await app.state.batcher.stop()
            b = app.state.batcher
            log.info("esn serve: batcher stopped after %d batches (%d rows)", b.batches, b.rows)

    app = FastAPI(title="esn", summary="Emotion control of speech-generative audio-language models",
                  lifespan=lifespan)
    app.add_middleware(AccessGuard, access=replace(access, open_paths=OPEN_PATHS))  # every route, later ones too
    app.add_middleware(Guard, metrics=metrics, max_body=limits.max_upload_bytes)
    from esn.serve import openai_api  # imports this module: not at the top

    app.include_router(openai_api.ChatCompletions(converter, metrics).router())

    def respond(request: Request, exc: RequestError) -> Response:  # the OpenAI routes answer OpenAI's shape
        return openai_api.error_response(exc) if openai_api.owns(request.url.path) else exc.response()

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        field = str(first.get("loc", ("", ""))[-1])
        problem = "missing" if first.get("type") == "missing" else first.get("msg", "invalid")
        hint = "; send a multipart/form-data body with fields audio (a file) and emotion" \
            if first.get("type") == "missing" else ""
        return respond(request, RequestError(400, "bad_request", f"field {field!r}: {problem}{hint}", field=field))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        code = _STATUS_CODES.get(exc.status_code, "error")
        return respond(request, RequestError(exc.status_code, code, str(exc.detail), headers=exc.headers))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("unexpected error", exc_info=exc)
        return respond(request, RequestError(500, "internal_error", f"{type(exc).__name__}: {exc}"))

    @app.post("/v1/convert", summary="convert the emotion of one speech file",
              responses={200: {"content": {"audio/wav": {}, "application/json": {}}}})
    async def convert(
        request: Request,
        audio: Annotated[UploadFile, File(description="source speech: wav, flac, ogg, mp3...; any rate and channels")],
        emotion: Annotated[str, Form(description="target emotion: happy, angry, sad, surprise or neutral")],
        mask_emotion: Annotated[str | None, Form(description="which emotion's mask steers (default: emotion)")] = None,
        method: Annotated[str | None, Form(description=f"steer, add, clamp, deactivate or {NO_STEERING}")] = None,
        alpha: Annotated[str | None, Form(description="intervention strength (default 1.0)")] = None,
        timeout: Annotated[str | None, Form(description="give up after this many seconds (<= the service's)")] = None,
        mask: Annotated[UploadFile | None, File(description="an esn mask file to use instead of the service's")] = None,
    ) -> Response:
        started = time.monotonic()
        wave = await run_in_threadpool(converter.audio, await audio.read(), audio.filename or "audio")
        uploaded = converter.uploaded_masks(await mask.read()) if mask is not None else None
        job = converter.job(audio=wave, emotion=emotion, mask_emotion=mask_emotion, method=method, alpha=alpha,
                            masks=uploaded, timeout=timeout, job_id=uuid.uuid4().hex[:12])
        future = submit(request, job, metrics)
        outcome = await await_outcome(request, job, future, started, metrics)
        if outcome is None:
            return Response(status_code=499)  # nobody reads it; the access log shows 499
        return _answer(request, job, outcome)

    @app.get("/v1/masks", summary="the masks, methods and alpha range this service offers")
    async def masks() -> dict:
        from esn.plugins import registry

        sets = converter.masks
        return {
            "adapter": converter.adapter.name,
            "model": converter.adapter.source,
            "layout": converter.adapter.layout().fingerprint,
            "methods": [*sorted(registry().interventions), NO_STEERING],
            "default_method": NO_STEERING if sets is None else "steer",
            "alpha_range": [-limits.max_alpha, limits.max_alpha],
            "masks": {} if sets is None else {
                e: {"neurons": len(m), "streams": list(m.layout.streams), "layout": m.layout.fingerprint}
                for e, m in sets.masks.items()},
            "meta": {} if sets is None else sets.meta,
        }

    @app.get("/healthz", summary="liveness")
    async def healthz(request: Request) -> dict:
        batcher: Batcher = request.app.state.batcher
        return {"status": "ok", "adapter": converter.adapter.name, "model": converter.adapter.source,
                "max_batch": converter.max_batch, "queue_depth": batcher.depth}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return app
