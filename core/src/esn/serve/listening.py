"""The FastAPI application of ``esn human serve``: one kit's listening page, its clips, and the answers.

- ``GET /``: the listening page (the same page ``esn human export`` writes as ``index.html``).
- ``GET /clips/<file>``: the clips the page lists, nothing else of the kit (``key.csv`` stays private).
- ``GET /api/kit``: the kit's id, kind, size and whether raters log in with codes (the page checks it is
  talking to its own kit).
- ``POST /api/login``: ``{"code": code}`` -> ``{"rater": id}`` when the server requires codes
  (``esn human serve --codes``); then the two calls below need ``Authorization: Bearer <code>`` and
  answer only for that code's rater, so a client cannot make up raters.
- ``GET /api/responses/<rater>``: a rater's stored answers (resume in another browser).
- ``PUT /api/responses/<rater>``: ``{"kit": id, "answers": {trial: choice}}``, the rater's whole answer set,
  checked and written atomically to ``<kit>/responses/<rater>.csv``: the file ``esn human import`` reads.
  Writes of one rater are serialised; the page sends them one after the other, so the file always holds
  the rater's latest complete set.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from esn.errors import EsnError
from esn.files import atomic_write_bytes
from esn.pipeline.listening import RESPONSES, Kit, check_rater, page
from esn.serve.errors import RequestError
from esn.serve.guard import Access, AccessGuard

MAX_ANSWERS_BYTES = 1_000_000


def _rater(rater: str) -> str:
    try:
        return check_rater(rater)
    except EsnError as exc:
        raise RequestError(400, "bad_rater", str(exc), field="rater") from None


def create_listening_app(kit: Kit, *, access: Access | None = None, codes: dict[str, str] | None = None) -> FastAPI:
    """The listening page's app: the page, the kit's clips (never its key) and each rater's answers.

    ``access``: Host names and origins (esn.serve.guard; default: loopback names only); ``codes``:
    ``{code: rater}``, the only raters who may store answers (None: any rater id)."""
    app = FastAPI(title="esn listening test", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(AccessGuard, access=access or Access.for_address("127.0.0.1"))  # every route
    html = page(kit)

    def authorized(rater: str, request: Request) -> str:
        """The rater of the request: ``rater`` itself without codes; with codes, the bearer code's rater."""
        rater = _rater(rater)
        if codes is None:
            return rater
        scheme, _, code = request.headers.get("authorization", "").partition(" ")
        owner = codes.get(code.strip()) if scheme.lower() == "bearer" else None
        if owner is None:
            raise RequestError(401, "bad_code", "this study needs the rater's code (Authorization: Bearer <code>); "
                               "log in on the page with the code you were given", headers={"WWW-Authenticate": "Bearer"})
        if owner != rater:
            raise RequestError(403, "wrong_rater", f"this code belongs to another rater than {rater!r}")
        return rater
    locks: dict[str, asyncio.Lock] = {}
    folder = kit.dir / RESPONSES

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
        return RequestError(exc.status_code, code, str(exc.detail), headers=exc.headers).response()

    @app.get("/", response_class=HTMLResponse)
    @app.get("/index.html", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @app.get("/clips/{name}")
    async def clip(name: str) -> FileResponse:
        if f"clips/{name}" not in kit.clips:  # only the listed clips: never the key or other files
            raise RequestError(404, "not_found", f"no clip {name!r} in this kit")
        return FileResponse(kit.dir / "clips" / name, media_type="audio/wav")

    @app.get("/api/kit")
    async def info() -> dict:
        return {"id": kit.id, "kind": kit.kind, "trials": len(kit.trials), "codes": codes is not None}

    @app.post("/api/login")
    async def login(request: Request) -> dict:
        if codes is None:
            raise RequestError(404, "no_codes", "this study issues no codes: raters choose their own id")
        body = await request.body()
        try:
            data = json.loads(body) if len(body) <= 4096 else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            data = None
        code = data.get("code") if isinstance(data, dict) else None
        if not isinstance(code, str) or code.strip() not in codes:
            raise RequestError(401, "bad_code", "unknown code: type the code you were given exactly")
        return {"rater": codes[code.strip()]}

    @app.get("/api/responses/{rater}")
    async def stored(rater: str, request: Request) -> dict:
        path = folder / f"{authorized(rater, request)}.csv"
        return {"rater": rater, "answers": kit.read_responses(path) if path.is_file() else {}}

    @app.put("/api/responses/{rater}")
    async def store(rater: str, request: Request) -> JSONResponse:
        rater = authorized(rater, request)
        body = await request.body()
        if len(body) > MAX_ANSWERS_BYTES:
            raise RequestError(413, "too_large", f"answers larger than {MAX_ANSWERS_BYTES} bytes")
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(400, "bad_json", f"the body is not JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("kit") != kit.id:
            raise RequestError(409, "wrong_kit", f"these answers are not for this kit ({kit.id}); reload the page")
        try:
            answers = kit.check_answers(data.get("answers"))
        except EsnError as exc:
            raise RequestError(422, "bad_answers", str(exc), field="answers") from None
        text = kit.responses_csv(rater, answers)
        async with locks.setdefault(rater, asyncio.Lock()):
            await asyncio.to_thread(atomic_write_bytes, folder / f"{rater}.csv", text.encode("utf-8"))
        return JSONResponse({"rater": rater, "saved": len(answers), "file": f"{RESPONSES}/{rater}.csv"})

    return app
