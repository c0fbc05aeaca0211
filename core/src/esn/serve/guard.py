"""What both services refuse before any route runs: foreign Host names, cross-origin writes, missing tokens,
oversized headers, and (below the application, in uvicorn's HTTP parser) malformed requests, as JSON.

Why each check exists (docs/service.md, "What is refused and why"):

- **Host.** A web page can make a browser send requests to ``127.0.0.1`` under a name it controls (DNS
  rebinding: ``evil.example`` resolving to 127.0.0.1). Such a request carries ``Host: evil.example``;
  only the bound address, the loopback names and what ``--allowed-host`` adds are answered.
- **Origin.** Any web page can POST a form to a local service (no CORS preflight for form posts), which
  would let a page a user merely visits run conversions. Writes (every method but GET, HEAD, OPTIONS)
  whose ``Origin`` (or, without one, ``Sec-Fetch-Site``) says they come from another origin are refused
  unless ``--allow-origin`` names that origin. Clients that are not browsers send neither header.
- **Token.** Set by ``--token-file``: ``Authorization: Bearer <token>`` on everything but the open paths.
- **Headers.** At most :data:`MAX_HEADER_BYTES` of request line and headers.

:class:`AccessGuard` is pure ASGI middleware added to the whole application, so every route, including
routes added later, passes through it.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_HEADER_BYTES = 16 * 1024  # request line + headers; browsers send ~1-2 KB, nginx allows 8 KB per line
# What uvicorn's parser buffers at most while headers arrive: past it the connection gets a JSON 400 and is
# closed unread; up to it the headers are read whole and the guard answers 431 (a clean answer, no reset).
MAX_BUFFERED_HEADER_BYTES = 8 * MAX_HEADER_BYTES
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
DEFAULT_PORTS = {"http": 80, "https": 443}


def _json(status: int, code: str, message: str, headers: dict[str, str] | None = None):
    """A JSON error response as a bare ASGI app (the guard runs outside FastAPI's exception handlers)."""
    body = json.dumps({"error": code, "message": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"connection", b"close")]  # the unread body must not be taken for the next request
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]

    async def respond(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    return respond


def _split_host(value: str) -> tuple[str, int | None] | None:
    """``(name, port)`` of a Host header value (``name``, ``name:port``, ``[v6]:port``), lower case; None if
    it is not one."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
    else:
        name, colon, port = value.partition(":")
        port = port if colon else None
        if ":" in (port or ""):
            return None
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        return None
    name = name.rstrip(".")
    return (name, int(port) if port is not None else None) if name else None


def _origin(value: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an Origin header value, None if it is not an http(s) origin."""
    try:
        parts = urlsplit(value.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        return None
    return parts.scheme, parts.hostname.rstrip("."), port or DEFAULT_PORTS[parts.scheme]


@dataclass(frozen=True)
class Access:
    """Who may talk to a service: Host names, origins allowed to write, the bearer token and its open paths."""

    hosts: frozenset[str]
    origins: frozenset[str] = frozenset()  # "scheme://host:port", normalised by :func:`normalize_origin`
    token: str | None = None
    open_paths: tuple[str, ...] = ()

    @classmethod
    def for_address(cls, host: str, *, allowed_hosts: Iterable[str] = (), allow_origins: Iterable[str] = (),
                    token: str | None = None, open_paths: Iterable[str] = ()) -> Access:
        """The access of a service bound to ``host``: that address, the loopback names and ``allowed_hosts``."""
        names = {host.strip().strip("[]").lower(), *LOOPBACK_NAMES}
        for name in allowed_hosts:
            split = _split_host(name)
            if split is None:
                raise ValueError(f"--allowed-host {name!r} is not a host name or address")
            names.add(split[0])
        return cls(frozenset(names), frozenset(normalize_origin(o) for o in allow_origins), token or None,
                   tuple(open_paths))


def normalize_origin(value: str) -> str:
    """``scheme://host:port`` of an origin given on the command line (ValueError if it is not one)."""
    parsed = _origin(value)
    if parsed is None:
        raise ValueError(f"--allow-origin {value!r} is not an origin such as http://localhost:3000")
    return "{}://{}:{}".format(*parsed)


class AccessGuard:
    """Pure ASGI middleware: Host, Origin / Sec-Fetch-Site, bearer token and header size, before any route."""

    def __init__(self, app, *, access: Access):
        self.app = app
        self.access = access
        self.token = access.token.encode() if access.token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refused = self.refusal(scope)
        if refused is not None:
            return await refused(scope, receive, send)
        return await self.app(scope, receive, send)

    def refusal(self, scope):
        """The error response for a request this service must not answer, or None."""
        raw = scope["headers"]
        size = sum(len(k) + len(v) + 4 for k, v in raw) + len(scope.get("raw_path") or b"") + 16
        if size > MAX_HEADER_BYTES:
            return _json(431, "headers_too_large", f"request headers of {size} bytes; this service accepts at most "
                         f"{MAX_HEADER_BYTES} bytes")
        headers = {}
        for k, v in raw:
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        host = _split_host(headers.get("host", ""))
        if host is None or host[0] not in self.access.hosts:
            shown = headers.get("host", "")[:100]
            return _json(400, "host_not_allowed",
                         f"Host {shown!r} is not a name of this service (allowed: "
                         f"{', '.join(sorted(self.access.hosts))}); start it with --allowed-host NAME to add one")
        if scope["method"] not in SAFE_METHODS:
            why = self._cross_origin(headers, host)
            if why:
                return _json(403, "cross_origin", f"{why}: this service accepts writes from its own pages and from "
                             "clients that are not browsers; start it with --allow-origin ORIGIN to allow one")
        if self.token is not None and scope["path"] not in self.access.open_paths and not self._authorized(headers):
            return _json(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)",
                         headers={"WWW-Authenticate": "Bearer"})
        return None

    def _cross_origin(self, headers: dict[str, str], host: tuple[str, int | None]) -> str | None:
        """Why a write comes from another origin, or None if it is same-origin, allowed, or not a browser's."""
        given = headers.get("origin")
        if given is not None:
            origin = _origin(given)
            if origin is not None:
                scheme, name, port = origin
                if "{}://{}:{}".format(*origin) in self.access.origins:
                    return None
                if name == host[0] and (port == host[1] or (host[1] is None and port == DEFAULT_PORTS[scheme])):
                    return None
            return f"Origin {given[:100]!r} is not this service's"
        site = headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return f"Sec-Fetch-Site {site[:40]!r}: the request comes from another site's page"
        return None

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, given = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), self.token)


def json_h11_protocol():
    """uvicorn's h11 protocol, answering a request it cannot parse (bad Content-Length, header line, request
    line; headers past :data:`MAX_HEADER_BYTES` while they arrive) with a JSON 400 instead of plain text."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class JsonErrorH11Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            body = json.dumps({"error": "bad_request", "message": "malformed HTTP request (request line, a header "
                               "or Content-Length), or headers too large"}).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return JsonErrorH11Protocol
