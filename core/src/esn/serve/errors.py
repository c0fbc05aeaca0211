"""The one error type of both services: an HTTP status, a short code and a one-line message, as JSON."""

from __future__ import annotations

from typing import Any


class RequestError(Exception):
    """A bad request: HTTP ``status``, a short ``code`` and a one-line ``message`` for the client."""

    def __init__(self, status: int, code: str, message: str, *, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """``{"error": code, "message": text}`` and the form ``field`` at fault, if one is."""
        out = {"error": self.code, "message": self.message}
        return out | ({"field": self.field} if self.field else {})

    def response(self):
        """The error as a FastAPI JSON response with its status code and headers."""
        from fastapi.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)
