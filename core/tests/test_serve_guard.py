"""esn.serve.guard: which Host names, origins and tokens reach a route, on plain ASGI scopes (the real servers
are driven in tests/test_serve.py and tests/test_listening.py)."""

from __future__ import annotations

import asyncio
import json

import pytest
from esn.serve.guard import MAX_HEADER_BYTES, Access, AccessGuard, normalize_origin


async def _ok(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def call(access: Access, method: str = "GET", path: str = "/v1/convert", **headers: str) -> tuple[int, dict | None]:
    """(status, JSON body or None) of one request through the guard in front of an app that answers 200."""
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(),
             "headers": [(k.replace("_", "-").lower().encode(), v.encode("latin-1")) for k, v in headers.items()]}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(AccessGuard(_ok, access=access)(scope, receive, send))
    status, body = sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])
    return status, (json.loads(body) if status != 200 else None)


LOCAL = Access.for_address("127.0.0.1")


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "LOCALHOST", "localhost.", "[::1]:8000",
                                  "127.0.0.1"])
def test_loopback_names_are_answered(host):
    assert call(LOCAL, host=host)[0] == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "10.0.0.5:8000",
                                  "localhost:99999", "[::1", "a:b:c", ""])
def test_other_host_names_are_refused_with_json(host):
    status, body = call(LOCAL, host=host) if host else call(LOCAL)
    assert status == 400 and body["error"] == "host_not_allowed" and "--allowed-host" in body["message"]


def test_the_bound_address_and_allowed_hosts_are_answered():
    lan = Access.for_address("0.0.0.0", allowed_hosts=["box.lan", "192.168.1.5"])
    for host in ("0.0.0.0:80", "box.lan:8000", "BOX.LAN", "192.168.1.5:8000", "localhost"):
        assert call(lan, host=host)[0] == 200, host
    assert call(lan, host="evil.example")[0] == 400
    assert call(Access.for_address("::1"), host="[::1]:9")[0] == 200
    with pytest.raises(ValueError, match="not a host name"):
        Access.for_address("127.0.0.1", allowed_hosts=["a b:c:d"])


def test_cross_origin_writes_are_refused_same_origin_and_non_browsers_pass():
    host = {"host": "127.0.0.1:8000"}
    assert call(LOCAL, "POST", **host)[0] == 200  # curl, httpx: no Origin, no Sec-Fetch-Site
    assert call(LOCAL, "POST", origin="http://127.0.0.1:8000", **host)[0] == 200
    assert call(LOCAL, "POST", sec_fetch_site="same-origin", **host)[0] == 200
    assert call(LOCAL, "POST", sec_fetch_site="none", **host)[0] == 200  # typed by the user
    assert call(LOCAL, "GET", origin="http://evil.example", **host)[0] == 200  # reads: the browser's CORS rules
    assert call(Access.for_address("localhost"), "PUT", origin="http://localhost", host="localhost")[0] == 200
    for headers in ({"origin": "http://evil.example"}, {"origin": "http://127.0.0.1:9000"},  # another local origin
                    {"origin": "https://127.0.0.1"}, {"origin": "null"}, {"origin": "garbage"},
                    {"sec_fetch_site": "cross-site"}, {"sec_fetch_site": "same-site"}):
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            status, body = call(LOCAL, method, **host, **headers)
            assert status == 403 and body["error"] == "cross_origin" and "--allow-origin" in body["message"], headers


def test_allow_origin_names_an_origin():
    access = Access.for_address("127.0.0.1", allow_origins=["http://localhost:3000", "HTTPS://App.Example/"])
    host = {"host": "127.0.0.1:8000"}
    assert call(access, "POST", origin="http://localhost:3000", **host)[0] == 200
    assert call(access, "POST", origin="https://app.example", **host)[0] == 200
    assert call(access, "POST", origin="http://localhost:3001", **host)[0] == 403
    assert normalize_origin("http://a.example") == "http://a.example:80"
    with pytest.raises(ValueError, match="is not an origin"):
        normalize_origin("ftp://a.example/path")


def test_token_and_open_paths():
    access = Access.for_address("127.0.0.1", token="s3cret", open_paths=["/healthz"])
    host = {"host": "localhost"}
    assert call(access, path="/healthz", **host)[0] == 200
    for auth in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic s3cret"}):
        status, body = call(access, path="/v1/masks", **host, **auth)
        assert status == 401 and body["error"] == "unauthorized"
    assert call(access, path="/v1/masks", authorization="Bearer s3cret", **host)[0] == 200
    # A foreign Host is refused before the token is even looked at.
    assert call(access, path="/v1/masks", authorization="Bearer s3cret", host="evil.example")[0] == 400


def test_oversized_headers_are_refused():
    status, body = call(LOCAL, host="localhost", cookie="x" * MAX_HEADER_BYTES)
    assert status == 431 and body["error"] == "headers_too_large"
    assert call(LOCAL, host="localhost", cookie="x" * (MAX_HEADER_BYTES // 2))[0] == 200
