"""`esn serve` end to end: the real server (uvicorn) on 127.0.0.1 with the tiny Qwen2.5-Omni, a real HTTP
client (httpx), answers compared with `esn convert` and with solo conversions of the same inputs."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from urllib.parse import unquote

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("esn_qwen_omni")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from esn.adapters import EVCRequest, GenerationConfig  # noqa: E402
from esn.artifacts import load_masks, save_masks  # noqa: E402
from esn.audio import prepare_audio  # noqa: E402
from esn.cli import main  # noqa: E402
from esn.emotions import TARGET_EMOTIONS  # noqa: E402
from esn.hookpoints import HookPoint, Layout  # noqa: E402
from esn.serve.server import launch  # noqa: E402
from esn.steering import steer  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

schemathesis = pytest.importorskip("schemathesis")
FUZZ_EXAMPLES = 300  # requests over all operations, fitting the schema and not: ~10 s on 2 cores

# One thread per process: the same kernels (and rounding) in the server, `esn convert` and the references.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
GEN = ["--max-new-tokens", "4", "--max-audio-tokens", "6"]
CONFIG = GenerationConfig(max_new_tokens=4, max_audio_tokens=6)


def speech(seconds: float, seed: int, rate: int = 16_000, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * (120 + 40 * seed) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    return np.stack([wave, 0.5 * wave], 1) if channels == 2 else wave


def wav_bytes(wave: np.ndarray, rate: int, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, rate, subtype=subtype, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch
    from esn_qwen_omni import QwenOmniAdapter

    root = tmp_path_factory.mktemp("serve")
    checkpoint = QwenOmniAdapter.write_tiny(root / "tiny", seed=0)
    adapter = QwenOmniAdapter.load(checkpoint)
    layout = adapter.layout()
    rng = np.random.default_rng(0)
    masks = root / "masks.safetensors"
    save_masks(masks, {e: rng.choice(layout.n_neurons, 24, replace=False) for e in TARGET_EMOTIONS}, layout=layout,
               meta={"selector": "random"})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the references below run like the server's single thread
    yield SimpleNamespace(root=root, checkpoint=checkpoint, masks=masks, adapter=adapter, sets=load_masks(masks))
    torch.set_num_threads(threads)


def solo(tiny, wave: np.ndarray, rate: int, emotion: str, mask_emotion=None, method="steer", alpha=None):
    """(text, wav bytes) of the conversion alone, the way `esn convert` runs it (steer() on one request)."""
    request = EVCRequest(prepare_audio(wave, rate), emotion)
    with contextlib.ExitStack() as stack:
        if method != "none":
            stack.enter_context(steer(tiny.adapter, tiny.sets[mask_emotion or emotion], method, alpha))
        (result,) = tiny.adapter.generate([request], CONFIG)
    return result.text, wav_bytes(result.waveform, result.sample_rate)


def serve_args(tiny, *extra) -> list[str]:
    return ["serve", "--adapter", "qwen_omni", "--model", str(tiny.checkpoint), "--masks", str(tiny.masks),
            "--port", "0", *GEN, *extra]


@pytest.fixture(scope="module")
def server(tiny):
    with launch(serve_args(tiny, "--max-wait-ms", "300", "--max-upload-mb", "1", "--max-seconds", "5",
                           "--allowed-host", "box.lan", "--allow-origin", "http://localhost:3000"), env=ENV) as s:
        yield s


def post(url: str, wav: bytes, *, json: bool = False, filename: str = "in.wav", timeout: float = 300, **fields):
    headers = {"Accept": "application/json"} if json else {}
    data = {k: str(v) for k, v in fields.items() if v is not None}
    return httpx.post(url + "/v1/convert", files={"audio": (filename, wav)}, data=data, headers=headers,
                      timeout=timeout)


def answer(response) -> tuple[str, bytes]:
    """(decoded text, wav bytes) of a 200 answer, wav or JSON."""
    assert response.status_code == 200, response.text
    if response.headers["content-type"].startswith("application/json"):
        body = response.json()
        return body["text"], base64.b64decode(body["audio_wav_base64"])
    assert response.headers["content-type"] == "audio/wav"
    return unquote(response.headers["x-esn-text"]), response.content


def samples(wav: bytes) -> np.ndarray:
    return sf.read(io.BytesIO(wav), dtype="int16")[0]


def metric(url: str, name: str) -> dict[str, float]:
    """``{label text: value}`` of one Prometheus metric family from /metrics."""
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        m = re.fullmatch(rf"{name}(\{{.*\}})? (\S+)", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def batch_sizes(url: str) -> dict[int, int]:
    """How many batches of each size ran so far (from the one-bucket-per-size histogram)."""
    cumulative = {int(float(re.search(r'le="([^"]+)"', k).group(1))): v
                  for k, v in metric(url, "esn_batch_size_bucket").items() if "+Inf" not in k}
    sizes = sorted(cumulative)
    return {s: int(cumulative[s] - (cumulative[sizes[i - 1]] if i else 0)) for i, s in enumerate(sizes)}


# -- answers ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_answers_equal_esn_convert(tiny, server, tmp_path, capsys):
    cases = [  # (file, rate, channels, form fields, `esn convert` flags)
        ("mono16k.wav", 16_000, 1, {"emotion": "happy", "alpha": 0.5}, ["--emotion", "happy", "--alpha", "0.5"]),
        ("stereo44k.wav", 44_100, 2, {"emotion": "angry", "mask_emotion": "sad", "method": "deactivate"},
         ["--emotion", "angry", "--mask-emotion", "sad", "--method", "deactivate"]),
    ]
    for n, (name, rate, channels, fields, flags) in enumerate(cases):
        path = tmp_path / name
        sf.write(path, speech(1.0, n, rate, channels), rate)
        out = tmp_path / f"out{n}.wav"
        # `esn convert` in this process (one torch thread, like the server): no second model import.
        assert main(["convert", str(path), "--adapter", "qwen_omni", "--model", str(tiny.checkpoint), "-o", str(out),
                     "--mask", str(tiny.masks), *GEN, *flags]) == 0
        printed = capsys.readouterr().out.rstrip("\n")
        as_wav = post(server.url, path.read_bytes(), **fields)
        as_json = post(server.url, path.read_bytes(), json=True, **fields)
        for response in (as_wav, as_json):
            text, wav = answer(response)
            assert wav == out.read_bytes()  # the same file, byte for byte
            assert text == printed
        body = as_json.json()
        assert body["emotion"] == fields["emotion"] and body["sample_rate"] == 24_000
        assert body["method"] == fields.get("method", "steer")
        assert body["mask_emotion"] == fields.get("mask_emotion", fields["emotion"])


@pytest.mark.slow
def test_sixteen_concurrent_clients_share_batches_and_each_equals_its_solo_run(tiny, server):
    methods = [("steer", 0.5), ("add", 0.3), ("clamp", 0.2), ("deactivate", None), ("none", None)]
    jobs = []
    for i in range(16):
        method, alpha = methods[i % len(methods)]
        emotion = TARGET_EMOTIONS[i % 4]
        mask_emotion = None if method == "none" else TARGET_EMOTIONS[(i // 4) % 4]
        wave = speech(0.6 + 0.05 * i, i)  # different lengths: rows are padded in the batch
        jobs.append({"wave": wave, "emotion": emotion, "mask_emotion": mask_emotion, "method": method, "alpha": alpha})
    before = batch_sizes(server.url)
    start = threading.Barrier(16)

    def client(i: int):
        job = jobs[i]
        fields = {k: job[k] for k in ("emotion", "mask_emotion", "method", "alpha")}
        start.wait()
        return post(server.url, wav_bytes(job["wave"], 16_000, "FLOAT"), json=i % 2 == 1, **fields)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(client, range(16)))
    after = batch_sizes(server.url)
    ran = {s: after.get(s, 0) - before.get(s, 0) for s in after if after.get(s, 0) - before.get(s, 0)}
    assert sum(s * k for s, k in ran.items()) == 16  # every request ran exactly once, in some batch
    assert max(ran) > 1 and sum(ran.values()) < 16, ran  # gathered into batches, visible in /metrics
    sizes = [int(r.headers.get("x-esn-batch-size") or r.json()["batch_size"]) for r in responses]
    assert max(sizes) == max(ran)
    for job, response in zip(jobs, responses, strict=True):
        text, wav = answer(response)
        ref_text, ref_wav = solo(tiny, job["wave"], 16_000, job["emotion"], job["mask_emotion"], job["method"],
                                 job["alpha"])
        assert text == ref_text
        # Batched rows reproduce their solo run up to the rounding of padded batched kernels.
        assert np.abs(samples(wav).astype(int) - samples(ref_wav).astype(int)).max() <= 2


@pytest.mark.slow
def test_uploaded_mask_and_endpoints(tiny, server, tmp_path):
    masks = httpx.get(server.url + "/v1/masks").json()
    assert masks["adapter"] == "qwen_omni" and masks["default_method"] == "steer"
    assert set(masks["masks"]) == set(TARGET_EMOTIONS) and masks["masks"]["happy"]["neurons"] == 24
    assert {"steer", "add", "clamp", "deactivate", "none"} <= set(masks["methods"])
    assert masks["meta"]["selector"] == "random"
    health = httpx.get(server.url + "/healthz").json()
    assert health["status"] == "ok" and health["max_batch"] == 16
    # A mask file sent with the request replaces the service's masks for that request.
    layout = tiny.adapter.layout()
    save_masks(tmp_path / "mine.safetensors", {"sad": np.arange(0, layout.n_neurons, 5)}, layout=layout)
    wave = speech(0.8, 3)
    response = httpx.post(server.url + "/v1/convert", timeout=300, data={"emotion": "happy", "mask_emotion": "sad"},
                          files={"audio": ("a.wav", wav_bytes(wave, 16_000)),
                                 "mask": ("m.safetensors", (tmp_path / "mine.safetensors").read_bytes())})
    text, wav = answer(response)
    request = EVCRequest(prepare_audio(wave, 16_000), "happy")
    with steer(tiny.adapter, load_masks(tmp_path / "mine.safetensors")["sad"]):
        (ref,) = tiny.adapter.generate([request], CONFIG)
    assert text == ref.text and wav == wav_bytes(ref.waveform, ref.sample_rate)
    counted = metric(server.url, "esn_requests_total")
    assert counted['{endpoint="/v1/convert",status="200"}'] >= 1
    assert metric(server.url, "esn_queue_depth") == {"": 0.0}
    assert metric(server.url, "esn_request_seconds_count")['{endpoint="/v1/convert"}'] >= 1


# -- bad requests -----------------------------------------------------------------------------------------


def _other_model_mask(tmp_path) -> bytes:
    other = Layout([HookPoint("lm", i, 4096, module="") for i in range(28)])
    save_masks(tmp_path / "other.safetensors", {"happy": np.arange(10)}, layout=other)
    return (tmp_path / "other.safetensors").read_bytes()


@pytest.mark.slow
def test_every_bad_request_gets_its_json_error(server, tmp_path):
    ok = wav_bytes(speech(0.5, 0), 16_000)
    url = server.url + "/v1/convert"
    cases = [  # (what, request kwargs, status, error code)
        ("no audio field", {"data": {"emotion": "happy"}, "files": {"x": ("x", b"1")}}, 400, "bad_request"),
        ("not multipart", {"json": {"emotion": "happy"}}, 400, "bad_request"),
        ("not audio", {"files": {"audio": ("a.wav", b"RIFF? no, just text" * 50)}, "data": {"emotion": "happy"}},
         415, "not_audio"),
        ("empty file", {"files": {"audio": ("a.wav", b"")}, "data": {"emotion": "happy"}}, 422, "bad_audio"),
        ("silence", {"files": {"audio": ("a.wav", wav_bytes(np.zeros(8000, np.float32), 16_000))},
                     "data": {"emotion": "happy"}}, 422, "bad_audio"),
        ("rate below 8 kHz", {"files": {"audio": ("a.wav", wav_bytes(speech(0.5, 0, 4_000), 4_000))},
                              "data": {"emotion": "happy"}}, 422, "bad_audio"),
        ("too long", {"files": {"audio": ("a.wav", wav_bytes(speech(6.0, 0, 8_000), 8_000))},
                      "data": {"emotion": "happy"}}, 413, "audio_too_long"),
        ("too large", {"files": {"audio": ("a.wav", b"\0" * 1_200_000)}, "data": {"emotion": "happy"}},
         413, "too_large"),
        ("unknown emotion", {"data": {"emotion": "joyful"}}, 422, "unknown_emotion"),
        ("unknown mask emotion", {"data": {"emotion": "happy", "mask_emotion": "bored"}}, 422, "unknown_emotion"),
        ("no mask for it", {"data": {"emotion": "neutral"}}, 422, "unknown_mask"),
        ("unknown method", {"data": {"emotion": "happy", "method": "amplify"}}, 422, "unknown_method"),
        ("alpha not a number", {"data": {"emotion": "happy", "alpha": "lots"}}, 422, "bad_alpha"),
        ("alpha not finite", {"data": {"emotion": "happy", "alpha": "nan"}}, 422, "bad_alpha"),
        ("steer alpha below -1", {"data": {"emotion": "happy", "alpha": "-2"}}, 422, "alpha_out_of_range"),
        ("alpha beyond the service's range", {"data": {"emotion": "happy", "method": "add", "alpha": "50"}},
         422, "alpha_out_of_range"),
        ("alpha for deactivate", {"data": {"emotion": "happy", "method": "deactivate", "alpha": "0.5"}},
         422, "alpha_out_of_range"),
        ("alpha without steering", {"data": {"emotion": "happy", "method": "none", "alpha": "0.5"}}, 422, "bad_request"),
        ("mask for another model", {"data": {"emotion": "happy"},
                                    "files": {"audio": ("a.wav", ok), "mask": ("m", _other_model_mask(tmp_path))}},
         422, "mask_mismatch"),
        ("damaged mask file", {"data": {"emotion": "happy"},
                               "files": {"audio": ("a.wav", ok), "mask": ("m", b"\x08" + b"\0" * 20)}}, 422, "bad_mask"),
        ("bad timeout", {"data": {"emotion": "happy", "timeout": "-1"}}, 422, "bad_timeout"),
        ("answer takes longer than asked", {"data": {"emotion": "happy", "timeout": "0.001"}}, 504, "timeout"),
    ]
    for what, kwargs, status, code in cases:
        kwargs = {"files": {"audio": ("a.wav", ok)}, **kwargs}
        if "json" in kwargs:
            kwargs.pop("files")
        response = httpx.post(url, timeout=300, **kwargs)
        assert response.status_code == status, (what, response.status_code, response.text)
        body = response.json()
        assert body["error"] == code and body["message"], (what, body)
    for method, path, status, code in (("GET", "/v1/convert", 405, "method_not_allowed"),
                                       ("GET", "/nowhere", 404, "not_found")):
        response = httpx.request(method, server.url + path)
        assert (response.status_code, response.json()["error"]) == (status, code)
    # Other sample rates and channel counts are resampled, not refused.
    for rate, channels in ((8_000, 1), (22_050, 2), (48_000, 1)):
        response = post(server.url, wav_bytes(speech(0.5, 1, rate, channels), rate), emotion="sad")
        assert response.status_code == 200, response.text
    assert httpx.get(server.url + "/healthz").status_code == 200  # still serving


# -- who may ask: Host, Origin, headers, malformed requests (issue #26, items 4 and 8) ---------------------


@pytest.mark.slow
def test_foreign_hosts_and_cross_origin_posts_are_refused(server):
    ok = wav_bytes(speech(0.5, 0), 16_000)
    form = {"files": {"audio": ("a.wav", ok)}, "data": {"emotion": "happy"}, "timeout": 300}
    before = metric(server.url, "esn_conversions_total")
    for method, path in (("GET", "/healthz"), ("GET", "/v1/masks"), ("GET", "/metrics"), ("POST", "/v1/convert"),
                         ("GET", "/openapi.json"), ("GET", "/nowhere")):
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):  # DNS rebinding
            response = httpx.request(method, server.url + path, headers={"Host": host})
            assert response.status_code == 400 and response.json()["error"] == "host_not_allowed", (path, host)
    # A page of another origin posting FormData (no CORS preflight for that): refused before it is read.
    other_local = server.url.rsplit(":", 1)[0] + ":1"
    for headers in ({"Origin": "http://evil.example"}, {"Origin": other_local}, {"Origin": "null"},
                    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
        response = httpx.post(server.url + "/v1/convert", headers=headers, **form)
        assert response.status_code == 403 and response.json()["error"] == "cross_origin", headers
        assert "--allow-origin" in response.json()["message"]
    assert metric(server.url, "esn_conversions_total") == before  # nothing was converted
    # What is allowed: the service's own origin, --allow-origin's, --allowed-host's names, non-browsers.
    for headers in ({"Origin": server.url}, {"Origin": "http://localhost:3000"}, {"Sec-Fetch-Site": "same-origin"},
                    {"Host": "box.lan:8000"}, {"Host": "localhost"}, {}):
        assert httpx.post(server.url + "/v1/convert", headers=headers, **form).status_code == 200, headers
    counted = metric(server.url, "esn_requests_total")
    assert counted['{endpoint="/v1/convert",status="403"}'] >= 5  # refusals are counted too


def _raw(url: str, head: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``head`` on a plain socket; (status, headers, body) of the answer (read until the server closes)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    top, _, body = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":  # one chunk and the last one
        size, _, rest = body.partition(b"\r\n")
        body = rest[: int(size, 16)]
    return int(lines[0].split()[1]), headers, body


@pytest.mark.slow
def test_malformed_requests_and_large_headers_get_json_errors(server):
    import json

    for length in (b"abc", b"-1", b"5, 6", b"1e3"):
        status, headers, body = _raw(server.url, b"POST /v1/convert HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                     b"Content-Length: " + length + b"\r\n\r\nhello")
        assert status == 400 and headers["content-type"] == "application/json", (length, headers)
        assert json.loads(body)["error"] == "bad_request", length
    status, headers, body = _raw(server.url, b"GARBAGE\r\n\r\n")
    assert status == 400 and json.loads(body)["error"] == "bad_request"
    # Headers past 16 KiB: read whole and refused (431) up to 128 KiB; past that uvicorn's parser stops
    # buffering, answers 400 and closes (a client still sending may see the connection reset instead).
    for size in (20_000, 64 * 1024, 120_000):
        response = httpx.get(server.url + "/healthz", headers={"X-Big": "x" * size})
        assert response.status_code == 431 and response.json()["error"] == "headers_too_large", size
    try:
        response = httpx.get(server.url + "/healthz", headers={"X-Big": "x" * 300_000})
        assert response.status_code == 400 and response.json()["error"] == "bad_request"
    except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError):
        pass  # refused before the client had sent everything
    assert httpx.get(server.url + "/healthz", headers={"X-Ok": "x" * 4000}).status_code == 200
    assert httpx.get(server.url + "/healthz").status_code == 200  # still serving


def test_serving_other_machines_needs_a_token(tiny, tmp_path, capsys):
    base = ["serve", "--adapter", "qwen_omni", "--model", str(tiny.checkpoint), "--port", "0"]
    for host in ("0.0.0.0", "::", "192.168.1.5"):
        assert main([*base, "--host", host]) != 0
        assert f"--host {host} serves other machines" in capsys.readouterr().err
    assert main([*base, "--allowed-host", "a b c:d:e"]) != 0
    assert "is not a host name" in capsys.readouterr().err
    assert main([*base, "--allow-origin", "localhost:3000/app"]) != 0
    assert "is not an origin" in capsys.readouterr().err


# -- property-based fuzzing of the API from its OpenAPI schema --------------------------------------------


@pytest.mark.slow
def test_fuzzed_requests_never_get_a_500_and_every_error_is_json(server):
    """Requests generated from the service's OpenAPI schema, fitting it and not (schemathesis's strategies
    driven by hypothesis; derandomized, bounded in examples): never a server error, every error a JSON body
    with its code. (schemathesis's own pytest integration needs pytest internals that pytest 9 removed, so
    its strategies are used directly.)"""
    from esn.serve.openai_api import PATHS as OPENAI_PATHS
    from hypothesis import given
    from hypothesis import strategies as st
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} >= {("POST", "/v1/convert"), ("GET", "/v1/masks")}
    cases = st.one_of([op.as_strategy(generation_mode=mode) for op in operations for mode in GenerationMode])
    seen = []

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(cases)
    def check(case):
        response = case.call(base_url=server.url, timeout=120)
        seen.append((case.method, case.path, response.status_code))
        assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])
        if response.status_code >= 400:
            kind = response.headers.get("content-type", [""])[0]  # schemathesis: every header is a list
            assert kind.startswith("application/json"), (case.method, case.path, response.status_code, kind)
            body, err = response.json(), response.json().get("error")
            if case.path.startswith(OPENAI_PATHS) and isinstance(err, dict):  # OpenAI's error shape on its routes
                assert err.get("message") and err.get("type"), body
            else:
                assert isinstance(err, str) and body.get("message"), body

    started = time.monotonic()
    check()
    print(f"fuzzed {len(seen)} requests in {time.monotonic() - started:.1f} s:",
          sorted({(m, p, c) for m, p, c in seen}))
    assert len({(m, p) for m, p, _ in seen}) == len(operations)  # every operation was fuzzed
    assert any(code >= 400 for *_, code in seen) and any(code == 200 for *_, code in seen)


# -- queue, disconnects, auth, shutdown -----------------------------------------------------------------


def _raw_request(url: str, wav: bytes, emotion: str) -> socket.socket:
    """Send a whole convert request on a plain socket and return it unread (the caller hangs up)."""
    host, port = url.removeprefix("http://").split(":")
    boundary = "esnboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"emotion\"\r\n\r\n{emotion}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"a.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode() + wav + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/convert HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(head + body)
    return sock


@pytest.mark.slow
def test_a_client_that_hangs_up_loses_nothing_for_the_others(tiny, server):
    """Four clients and two that hang up while all six are queued or in the batch: the four get their solo
    answers, the two are noticed (dropped, or their rows' answers thrown away), and serving goes on."""
    waves = [speech(0.7 + 0.1 * i, 10 + i) for i in range(4)]
    before = metric(server.url, "esn_conversions_total")
    start = threading.Barrier(4 + 1)

    def client(i: int):
        start.wait()
        return post(server.url, wav_bytes(waves[i], 16_000), emotion=TARGET_EMOTIONS[i], alpha=0.5)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, i) for i in range(4)]
        start.wait()
        quitters = [_raw_request(server.url, wav_bytes(speech(0.9, 30 + k), 16_000), e)
                    for k, e in enumerate(("sad", "angry"))]
        deadline = time.time() + 60
        while True:  # all six accepted, none answered yet
            waiting = metric(server.url, "esn_rows_in_flight")[""] + metric(server.url, "esn_queue_depth")[""]
            if waiting == 6:
                break
            assert time.time() < deadline, "the six requests were never in the service at once"
            time.sleep(0.01)
        for sock in quitters:
            sock.close()
        responses = [f.result() for f in futures]
    for i, response in enumerate(responses):
        text, wav = answer(response)
        ref_text, ref_wav = solo(tiny, waves[i], 16_000, TARGET_EMOTIONS[i], alpha=0.5)
        assert text == ref_text
        assert np.abs(samples(wav).astype(int) - samples(ref_wav).astype(int)).max() <= 2
    delta = {}
    deadline = time.time() + 60
    while delta.get('{outcome="disconnected"}') != 2 and time.time() < deadline:
        after = metric(server.url, "esn_conversions_total")
        delta = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
        time.sleep(0.05)
    assert delta == {'{outcome="ok"}': 4, '{outcome="disconnected"}': 2}, delta
    assert answer(post(server.url, wav_bytes(waves[0], 16_000), emotion="happy"))[1]  # still serving


@pytest.fixture(scope="module")
def small_server(tiny, tmp_path_factory):
    """One row at a time, one waiting: the queue fills fast. Needs a bearer token. Up to 256 text tokens:
    a conversion lasts a second or two, so a test sees one running while another waits."""
    token = tmp_path_factory.mktemp("token") / "token"
    token.write_text("s3cret\n")
    with launch(serve_args(tiny, "--max-batch", "1", "--queue-size", "1", "--max-wait-ms", "0", "--max-new-tokens", "256",
                           "--token-file", str(token)), env=ENV) as s:
        s.auth = {"Authorization": "Bearer s3cret"}
        yield s


@pytest.mark.slow
def test_bearer_token(small_server):
    url = small_server.url
    assert httpx.get(url + "/healthz").status_code == 200  # liveness needs no token
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        for method, path in (("GET", "/v1/masks"), ("GET", "/metrics"), ("POST", "/v1/convert")):
            response = httpx.request(method, url + path, headers=headers)
            assert response.status_code == 401 and response.json()["error"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url + "/v1/masks", headers=small_server.auth).status_code == 200


@pytest.mark.slow
def test_a_full_queue_answers_429(small_server):
    wav = wav_bytes(speech(1.0, 5), 16_000)
    start = threading.Barrier(12)

    def client(i: int):
        start.wait()
        return httpx.post(small_server.url + "/v1/convert", files={"audio": ("a.wav", wav)},
                          data={"emotion": "happy"}, headers=small_server.auth, timeout=300)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(client, range(12)))
    codes = sorted(r.status_code for r in responses)
    # Usually one runs and one waits. If all twelve are parsed before the batcher takes the first, that one
    # fills the one-place queue and only it is accepted (the shutdown test shows one running + one waiting).
    assert set(codes) == {200, 429}, codes
    for response in responses:
        if response.status_code == 429:
            assert response.json()["error"] == "queue_full" and response.headers["retry-after"] == "1"
    counted = httpx.get(small_server.url + "/metrics", headers=small_server.auth).text
    assert f'esn_conversions_total{{outcome="queue_full"}} {codes.count(429)}.0' in counted


@pytest.mark.slow
def test_shutdown_finishes_the_requests_in_flight(small_server):
    """SIGTERM while one request runs and one waits: both are answered, then the process ends.

    The second request is sent once the first runs. On a loaded machine the first can still end before
    the second is queued, or (both parsed before the batcher takes the first) the second can find the
    one-place queue full; then that pair is answered normally (200 or 429) and a new pair is sent."""
    wav = wav_bytes(speech(1.0, 6), 16_000)

    def gauges() -> tuple[bool, bool]:
        text = httpx.get(small_server.url + "/metrics", headers=small_server.auth).text
        return (bool(re.search(r"^esn_rows_in_flight 1\.0$", text, re.M)),
                bool(re.search(r"^esn_queue_depth 1\.0$", text, re.M)))

    def convert(emotion: str):
        return pool.submit(httpx.post, small_server.url + "/v1/convert", files={"audio": ("a.wav", wav)},
                           data={"emotion": emotion}, headers=small_server.auth, timeout=300)

    with ThreadPoolExecutor(2) as pool:
        for _attempt in range(8):
            futures = [convert("sad")]
            while not gauges()[0] and not futures[0].done():
                time.sleep(0.005)
            futures.append(convert("angry"))
            while not (seen := all(gauges())) and not all(f.done() for f in futures):
                time.sleep(0.005)
            if seen:
                break
            assert {f.result().status_code for f in futures} <= {200, 429}
        else:
            pytest.fail("in 8 pairs of requests, one never ran while the other waited")
        code = small_server.stop()  # SIGTERM: uvicorn's graceful shutdown
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200, 200]
    assert all(answer(r)[1] for r in responses)
    log = "".join(small_server.log)
    assert code in (0, -15), log[-2000:]
    assert "batcher stopped after" in log and "Finished server process" in log


@pytest.mark.slow
def test_the_python_example_in_docs_service_md_runs(server, tmp_path):
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "service.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    code = next(b for b in blocks if "/v1/convert" in b)  # the httpx one (the page opens with the openai client's)
    sf.write(tmp_path / "neutral.wav", speech(0.8, 4), 16_000)
    code = (code.replace("http://127.0.0.1:8000", server.url).replace('"neutral.wav"', repr(str(tmp_path / "neutral.wav")))
            .replace('"sad.wav"', repr(str(tmp_path / "sad.wav"))))
    exec(compile(code, "docs/service.md", "exec"), {})
    wave, rate = sf.read(tmp_path / "sad.wav")
    assert rate == 24_000 and wave.size > 0


def test_serve_refuses_bad_settings_before_serving(tiny, tmp_path, capsys):
    base = ["serve", "--adapter", "qwen_omni", "--model", str(tiny.checkpoint), "--port", "0"]
    other = tmp_path / "other.safetensors"
    other.write_bytes(_other_model_mask(tmp_path))
    for extra, message, code in (  # 2: the command line is wrong; 1: a file it names does not fit
        (["--max-batch", "0"], "max_batch must be at least 1", 2),
        (["--timeout", "0"], "timeout_s must be a positive number", 2),
        (["--option", "token2wav_batch"], "expected KEY=VALUE", 2),
        (["--masks", str(tmp_path / "missing.safetensors")], "file not found", 1),
        (["--token-file", str(tmp_path / "missing-token")], "cannot read", 1),
        (["--masks", str(other)], "another hook-point layout", 1),  # checked against the loaded model
        (["--port", "70000"], "is not a TCP port", 2),
    ):
        assert main(base + extra) == code, extra
        assert message in capsys.readouterr().err, extra
