"""`esn serve`'s OpenAI-compatible API end to end: the real server (uvicorn) on 127.0.0.1 with the tiny
Qwen2.5-Omni, driven by the official `openai` Python client; answers compared with `esn convert` and with
solo conversions of the same inputs."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("esn_qwen_omni")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from esn.adapters import EVCRequest, GenerationConfig  # noqa: E402
from esn.artifacts import load_masks, save_masks  # noqa: E402
from esn.audio import prepare_audio  # noqa: E402
from esn.cli import main  # noqa: E402
from esn.emotions import TARGET_EMOTIONS  # noqa: E402
from esn.serve.openai_api import CHUNK_SECONDS  # noqa: E402
from esn.serve.server import launch  # noqa: E402
from esn.steering import steer  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the server's kernels (and rounding) = this process's
GEN = ["--max-new-tokens", "4", "--max-audio-tokens", "6"]
CONFIG = GenerationConfig(max_new_tokens=4, max_audio_tokens=6)


def speech(seconds: float, seed: int, rate: int = 16_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * (120 + 40 * seed) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def encoded(wave: np.ndarray, rate: int = 16_000, fmt: str = "WAV", subtype: str | None = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def samples(wav: bytes) -> np.ndarray:
    return sf.read(io.BytesIO(wav), dtype="int16")[0]


def messages(data: bytes, fmt: str = "wav") -> list[dict]:
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}
    return [{"role": "user", "content": [part]}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch
    from esn_qwen_omni import QwenOmniAdapter

    root = tmp_path_factory.mktemp("openai")
    checkpoint = QwenOmniAdapter.write_tiny(root / "tiny", seed=0)
    adapter = QwenOmniAdapter.load(checkpoint)
    layout = adapter.layout()
    rng = np.random.default_rng(0)
    masks = root / "masks.safetensors"
    save_masks(masks, {e: rng.choice(layout.n_neurons, 24, replace=False) for e in TARGET_EMOTIONS}, layout=layout,
               meta={"selector": "random"})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield SimpleNamespace(root=root, checkpoint=checkpoint, masks=masks, adapter=adapter, sets=load_masks(masks))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(tiny):
    token = tiny.root / "token"
    token.write_text("s3cret\n")
    args = ["serve", "--adapter", "qwen_omni", "--model", str(tiny.checkpoint), "--masks", str(tiny.masks),
            "--port", "0", "--max-wait-ms", "300", "--max-seconds", "5", "--token-file", str(token), *GEN]
    with launch(args, env=ENV) as s:
        s.client = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0, timeout=300)
        s.auth = {"Authorization": "Bearer s3cret"}
        yield s


def solo(tiny, wave: np.ndarray, emotion: str, mask_emotion=None, method="steer", alpha=None) -> tuple[str, bytes]:
    """(text, wav bytes) of the conversion alone, as `esn convert` runs it."""
    request = EVCRequest(prepare_audio(wave, 16_000), emotion)
    with contextlib.ExitStack() as stack:
        if method != "none":
            stack.enter_context(steer(tiny.adapter, tiny.sets[mask_emotion or emotion], method, alpha))
        (result,) = tiny.adapter.generate([request], CONFIG)
    return result.text, encoded(result.waveform, result.sample_rate)


def streamed(client, data: bytes, esn: dict, fmt: str = "wav", **options) -> SimpleNamespace:
    """One streamed chat completion: the chunks, the transcript and pcm16 audio they concatenate to."""
    chunks = list(client.chat.completions.create(
        model="qwen_omni", messages=messages(data, fmt), modalities=["text", "audio"],
        audio={"voice": "default", "format": "pcm16"}, stream=True, extra_body={"esn": esn}, **options))
    text, pcm = "", b""
    for chunk in chunks:
        for choice in chunk.choices:
            audio = choice.delta.audio
            if audio is not None:
                text += getattr(audio, "transcript", None) or ""
                pcm += base64.b64decode(getattr(audio, "data", None) or "")
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason == "stop"]
    assert len(final) == 1 and final[0] is [c for c in chunks if c.choices][-1]
    return SimpleNamespace(chunks=chunks, text=text, pcm=np.frombuffer(pcm, "<i2"), esn=final[0].model_extra["esn"])


def rows_run(url: str, auth: dict) -> float:
    """Rows the batcher ran so far (the sum of the batch-size histogram)."""
    for line in httpx.get(url + "/metrics", headers=auth).text.splitlines():
        if line.startswith("esn_batch_size_sum "):
            return float(line.split()[1])
    return 0.0


# -- models and answers -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_models_list(server, tiny):
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["qwen_omni"]
    assert models.data[0].owned_by == "esn" and models.data[0].model_extra["source"] == str(tiny.checkpoint)
    assert server.client.models.retrieve("qwen_omni").id == "qwen_omni"
    with pytest.raises(openai.NotFoundError) as caught:
        server.client.models.retrieve("gpt-4o")
    assert caught.value.body["code"] == "model_not_found"


@pytest.mark.slow
def test_chat_completions_equal_esn_convert(server, tiny, tmp_path, capsys):
    """wav and mp3 in; wav and pcm16 out, streamed and not: each the file `esn convert` writes."""
    cases = [  # (input format, esn controls, `esn convert` flags)
        ("wav", {"emotion": "happy", "alpha": 0.5}, ["--emotion", "happy", "--alpha", "0.5"]),
        ("mp3", {"emotion": "angry", "mask_emotion": "sad", "method": "deactivate"},
         ["--emotion", "angry", "--mask-emotion", "sad", "--method", "deactivate"]),
    ]
    for n, (fmt, esn, flags) in enumerate(cases):
        path = tmp_path / f"in{n}.{fmt}"
        path.write_bytes(encoded(speech(1.0, n), 16_000, fmt.upper(), None if fmt == "mp3" else "PCM_16"))
        out = tmp_path / f"out{n}.wav"
        assert main(["convert", str(path), "--adapter", "qwen_omni", "--model", str(tiny.checkpoint), "-o", str(out),
                     "--mask", str(tiny.masks), *GEN, *flags]) == 0
        printed = capsys.readouterr().out.rstrip("\n")
        data = path.read_bytes()
        for out_format in ("wav", "pcm16"):
            answer = server.client.chat.completions.create(
                model="qwen_omni", messages=messages(data, fmt), modalities=["text", "audio"],
                audio={"voice": "Chelsie", "format": out_format}, extra_body={"esn": esn})
            audio = answer.choices[0].message.audio
            assert answer.choices[0].finish_reason == "stop" and audio.transcript == printed
            got = base64.b64decode(audio.data)
            if out_format == "wav":
                assert got == out.read_bytes()  # byte for byte
            else:
                assert np.array_equal(np.frombuffer(got, "<i2"), samples(out.read_bytes()))
            facts = answer.model_extra["esn"]
            assert facts["emotion"] == esn["emotion"] and facts["method"] == esn.get("method", "steer")
        stream = streamed(server.client, data, esn, fmt, stream_options={"include_usage": True})
        assert stream.text == printed
        assert np.array_equal(stream.pcm, samples(out.read_bytes()))
        pieces = [c for c in stream.chunks if c.choices and c.choices[0].delta.audio
                  and getattr(c.choices[0].delta.audio, "data", None)]
        assert len(pieces) == -(-stream.pcm.size // int(CHUNK_SECONDS * 24_000))  # in chunks of CHUNK_SECONDS
        assert stream.chunks[-1].usage.completion_tokens > 0 and stream.chunks[-1].choices == []
        text_only = server.client.chat.completions.create(
            model="qwen_omni", messages=messages(data, fmt), extra_body={"esn": esn})
        assert text_only.choices[0].message.content == printed and text_only.choices[0].message.audio is None


@pytest.mark.slow
def test_the_stream_is_sse_ending_with_done(server):
    body = {"model": "qwen_omni", "messages": messages(encoded(speech(0.6, 3))), "modalities": ["text", "audio"],
            "audio": {"voice": "default", "format": "pcm16"}, "stream": True, "esn": {"emotion": "sad"}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=server.auth,
                      timeout=300) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    first = json.loads(events[0])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
    # text only: the text comes as content deltas, as the non-streamed answer's content
    text_only = {k: v for k, v in body.items() if k not in ("audio", "esn")} | {"modalities": ["text"],
                                                                                "extra_body": {"esn": body["esn"]}}
    chunks = list(server.client.chat.completions.create(**text_only))
    whole = server.client.chat.completions.create(**(text_only | {"stream": False}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content


# -- many clients -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_eight_concurrent_streams_each_equal_their_solo_run_and_batch_with_convert_rows(server, tiny):
    methods = [("steer", 0.5), ("add", 0.3), ("clamp", 0.2), ("deactivate", None), ("none", None)]
    jobs = []
    for i in range(8):
        method, alpha = methods[i % len(methods)]
        esn = {"emotion": TARGET_EMOTIONS[i % 4], "method": method}
        if method != "none":
            esn |= {"mask_emotion": TARGET_EMOTIONS[(i + 1) % 4]} | ({"alpha": alpha} if alpha is not None else {})
        jobs.append((speech(0.6 + 0.05 * i, 40 + i), esn))
    convert_wave = speech(0.7, 60)
    start = threading.Barrier(9)

    def client(i: int):
        start.wait()
        if i == 8:  # one /v1/convert row among the chat rows
            return httpx.post(server.url + "/v1/convert", files={"audio": ("a.wav", encoded(convert_wave))},
                              data={"emotion": "happy", "alpha": "0.5"},
                              headers={**server.auth, "Accept": "application/json"}, timeout=300).json()
        wave, esn = jobs[i]
        return streamed(server.client, encoded(wave), esn)

    with ThreadPoolExecutor(9) as pool:
        results = list(pool.map(client, range(9)))
    for (wave, esn), got in zip(jobs, results, strict=False):
        ref_text, ref_wav = solo(tiny, wave, esn["emotion"], esn.get("mask_emotion"), esn["method"], esn.get("alpha"))
        assert got.text == ref_text
        # batched rows reproduce their solo run up to the rounding of padded batched kernels (as /v1/convert)
        assert got.pcm.size == samples(ref_wav).size
        assert np.abs(got.pcm.astype(int) - samples(ref_wav).astype(int)).max() <= 2
    assert max(r.esn["batch_size"] for r in results[:8]) > 1  # the streams shared batches
    assert results[8]["batch_size"] > 1  # ... and so did the /v1/convert row


@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_frees_its_row_and_the_others_are_right(server, tiny):
    """A stream whose client closes after the first chunk (while its row waits for the batch) is dropped
    before the batch runs; the streams sent beside it get their solo answers."""
    before = rows_run(server.url, server.auth)
    body = {"model": "qwen_omni", "messages": messages(encoded(speech(0.8, 70))), "modalities": ["text", "audio"],
            "audio": {"voice": "default", "format": "pcm16"}, "stream": True, "esn": {"emotion": "angry"}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=server.auth,
                      timeout=300) as response:
        assert response.status_code == 200
        first = next(response.iter_lines())
        assert first.startswith("data: ")  # the role chunk: the row is queued
    # the connection is closed; two more streams run
    waves = [speech(0.7, 71), speech(0.9, 72)]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda i: streamed(server.client, encoded(waves[i]), {"emotion": TARGET_EMOTIONS[i]}),
                            range(2)))
    for wave, emotion, result in zip(waves, TARGET_EMOTIONS, got, strict=False):
        ref_text, ref_wav = solo(tiny, wave, emotion)
        assert result.text == ref_text
        assert np.abs(result.pcm.astype(int) - samples(ref_wav).astype(int)).max() <= 2
    deadline = time.time() + 30
    while rows_run(server.url, server.auth) - before < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert rows_run(server.url, server.auth) - before == 2  # the row of the client that left never ran
    counted = httpx.get(server.url + "/metrics", headers=server.auth).text
    assert 'esn_conversions_total{outcome="disconnected"}' in counted


@pytest.mark.slow
def test_rows_with_different_voices_each_speak_their_own(server, tiny):
    """Two requests sent together with different voices: each equals its solo run with that speaker (one
    generate per voice: a generate speaks with one voice)."""
    wave = speech(0.7, 80)
    start = threading.Barrier(2)

    def client(voice: str):
        start.wait()
        return server.client.chat.completions.create(
            model="qwen_omni", messages=messages(encoded(wave)), modalities=["text", "audio"],
            audio={"voice": voice, "format": "wav"}, extra_body={"esn": {"emotion": "happy", "method": "none"}})

    with ThreadPoolExecutor(2) as pool:
        answers = dict(zip(("Chelsie", "Ethan"), pool.map(client, ("chelsie", "Ethan")), strict=True))
    request = EVCRequest(prepare_audio(wave, 16_000), "happy")
    for voice, answer in answers.items():
        (result,) = tiny.adapter.generate([request], CONFIG.model_copy(update={"speaker": voice}))
        assert base64.b64decode(answer.choices[0].message.audio.data) == encoded(result.waveform, result.sample_rate)
        assert answer.model_extra["esn"]["voice"] == voice
    assert answers["Chelsie"].choices[0].message.audio.data != answers["Ethan"].choices[0].message.audio.data


@pytest.mark.slow
def test_a_full_queue_answers_429_in_openai_shape(tiny):
    """One row at a time and one waiting (up to 256 text tokens: a conversion lasts a second or two): of
    twelve chat requests sent together, streamed or not, the ones that find the queue full get 429
    before any event, which the openai client raises as RateLimitError; the others are answered."""
    args = ["serve", "--adapter", "qwen_omni", "--model", str(tiny.checkpoint), "--port", "0", "--max-batch", "1",
            "--queue-size", "1", "--max-wait-ms", "0", *GEN, "--max-new-tokens", "256"]
    data = encoded(speech(1.0, 90))
    with launch(args, env=ENV) as small:
        client = openai.OpenAI(base_url=small.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        start = threading.Barrier(12)

        def one(i: int):
            start.wait()
            try:
                if i % 2:
                    streamed(client, data, {"emotion": "happy"})
                else:
                    client.chat.completions.create(model="qwen_omni", messages=messages(data),
                                                   modalities=["text", "audio"],
                                                   audio={"voice": "default", "format": "wav"},
                                                   extra_body={"esn": {"emotion": "sad"}})
                return 200
            except openai.RateLimitError as exc:
                assert exc.body["code"] == "queue_full" and exc.body["type"] == "rate_limit_error"
                assert exc.response.headers["retry-after"] == "1"
                return 429

        with ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(one, range(12)))
    assert set(codes) == {200, 429}, codes


# -- errors -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bad_bodies_get_openai_errors(server):
    good_audio = messages(encoded(speech(0.5, 1)))
    good = {"model": "qwen_omni", "messages": good_audio, "modalities": ["text", "audio"],
            "audio": {"voice": "default", "format": "wav"}, "esn": {"emotion": "happy"}}
    text_part = [{"role": "user", "content": [{"type": "text", "text": "make it happy"}]}]
    system = [{"role": "system", "content": "be happy"}, *good_audio]
    mp3_label = messages(encoded(speech(0.5, 1)), "mp3")
    not_audio = messages(b"this is no sound file")
    cases = [  # (change to the good body, status, param, code)
        ({"temperature": 0.7}, 400, "temperature", "unknown_parameter"),
        ({"model": "gpt-4o-audio-preview"}, 404, "model", "model_not_found"),
        ({"esn": {"emotion": "happy", "strength": 2}}, 400, "esn.strength", "unknown_parameter"),
        ({"esn": None}, 400, "esn", "missing_required_parameter"),
        ({"esn": {"emotion": "joy"}}, 422, "esn.emotion", "unknown_emotion"),
        ({"esn": {"emotion": "happy", "alpha": "lots"}}, 400, "esn.alpha", "invalid_type"),
        ({"esn": {"emotion": "happy", "alpha": 99}}, 422, "esn.alpha", "alpha_out_of_range"),
        ({"esn": {"emotion": "happy", "method": "amplify"}}, 422, "esn.method", "unknown_method"),
        ({"esn": {"emotion": "happy", "mask_emotion": "fear"}}, 422, "esn.mask_emotion", "unknown_emotion"),
        ({"stream": True}, 400, "audio.format", "unsupported_value"),  # streamed audio is pcm16
        ({"stream": "yes"}, 400, "stream", "invalid_type"),
        ({"stream_options": {"include_usage": True}}, 400, "stream_options", "unsupported_value"),
        ({"modalities": ["audio"]}, 400, "modalities", "unsupported_value"),
        ({"modalities": [1, "text"]}, 400, "modalities", "unsupported_value"),
        ({"audio": None}, 400, "audio", "missing_required_parameter"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, 422, "audio.voice", "unknown_voice"),
        ({"audio": {"voice": "default", "format": "flac"}}, 400, "audio.format", "unsupported_value"),
        ({"audio": {"voice": "default", "format": "wav", "speed": 2}}, 400, "audio.speed", "unknown_parameter"),
        ({"n": 2}, 400, "n", "unsupported_value"),
        ({"n": True}, 400, "n", "unsupported_value"),
        ({"messages": text_part}, 400, "messages[0].content[0].type", "unsupported_value"),
        ({"messages": system}, 400, "messages", "unsupported_value"),
        ({"messages": []}, 400, "messages", "invalid_type"),
        ({"messages": mp3_label}, 400, "messages[0].content[0].input_audio.format", "invalid_value"),
        ({"messages": not_audio}, 415, "messages[0].content[0].input_audio.data", "not_audio"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
            "data": "%%%", "format": "wav"}}]}]}, 400, "messages[0].content[0].input_audio.data", "invalid_value"),
        ({"messages": messages(encoded(speech(6.0, 2)))}, 413, "messages[0].content[0].input_audio.data",
         "audio_too_long"),
    ]
    for change, status, param, code in cases:
        body = {k: v for k, v in (good | change).items() if v is not None or k == "esn"}
        if body.get("esn") is None:
            body.pop("esn")
        response = httpx.post(server.url + "/v1/chat/completions", json=body, headers=server.auth, timeout=60)
        assert response.status_code == status, (change, response.text)
        error = response.json()["error"]
        assert (error["param"], error["code"]) == (param, code), (change, error)
        assert error["type"] == "invalid_request_error" and error["message"]
    for raw, code in ((b"{not json", "invalid_json"), (b"[" * 100_000, "invalid_json"), (b"[1, 2]", "invalid_type")):
        response = httpx.post(server.url + "/v1/chat/completions", content=raw, headers=server.auth)
        assert response.status_code == 400 and response.json()["error"]["code"] == code, response.text
    # the official client raises its typed errors from these answers
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        server.client.chat.completions.create(model="qwen_omni", messages=good_audio, modalities=["text", "audio"],
                                              audio={"voice": "default", "format": "wav"},
                                              extra_body={"esn": {"emotion": "joy"}})
    assert caught.value.body["param"] == "esn.emotion"
    with pytest.raises(openai.BadRequestError):
        server.client.chat.completions.create(model="qwen_omni", messages=good_audio, temperature=0.2,
                                              extra_body={"esn": {"emotion": "happy"}})
    with pytest.raises(openai.AuthenticationError):  # the same bearer token as /v1/convert
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.slow
def test_the_openai_example_opening_docs_service_md_runs(server, tmp_path):
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "service.md").read_text()
    first = re.search(r"```(\w+)\n(.*?)```", page[page.index("Any OpenAI client"):], re.S)
    assert first.group(1) == "python" and "from openai import OpenAI" in first.group(2)
    sf.write(tmp_path / "neutral.wav", speech(0.8, 4), 16_000)
    code = (first.group(2).replace("http://127.0.0.1:8000", server.url).replace('"unused-without-a-token"', '"s3cret"')
            .replace('"neutral.wav"', repr(str(tmp_path / "neutral.wav")))
            .replace('"sad.wav"', repr(str(tmp_path / "sad.wav"))))
    exec(compile(code, "docs/service.md", "exec"), {})
    wave, rate = sf.read(tmp_path / "sad.wav")
    assert rate == 24_000 and wave.size > 0
