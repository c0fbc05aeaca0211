"""Time to first audio through `esn serve`'s OpenAI-compatible streaming API, beside the whole conversion.

    python benchmarks/bench_first_audio.py                      # CPU, tiny Qwen2.5-Omni written on the fly
    python benchmarks/bench_first_audio.py --concurrency 1 8 --rounds 4 --json out.json
    python benchmarks/bench_first_audio.py --model /ckpt/Qwen2.5-Omni-7B --masks masks.safetensors --device cuda

Starts the real server (``python -m esn serve``) on 127.0.0.1; each client sends ``POST /v1/chat/completions``
with ``stream: true`` over HTTP (httpx, reading the server-sent events as they arrive) and times, from the
moment it sends the request:

- ``first_event_s``: the first SSE event (the role chunk, sent when the row is queued);
- ``first_audio_s``: the first event carrying ``delta.audio.data`` (time to first audio);
- ``done_s``: ``data: [DONE]`` (the whole answer);

and, with the same settings and input, ``POST /v1/convert`` (``whole_convert_s``: the whole conversion as a
non-streamed request). At each concurrency ``c``, ``c`` clients start together, ``--rounds`` times; the
report has per-phase medians and p90s and the server's batch sizes. Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import EMOTIONS, batch_histogram, speech_wav, tiny_model


def stream_once(client, url: str, model_id: str, wav: bytes, emotion: str) -> dict:
    """One streamed chat completion; the times (s) of its first event, first audio and [DONE]."""
    body = {"model": model_id, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}]}],
        "modalities": ["text", "audio"], "audio": {"voice": "default", "format": "pcm16"}, "stream": True,
        "esn": {"emotion": emotion}}
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"{response.status_code}: {response.text}")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            now = time.perf_counter() - t0
            times.setdefault("first_event_s", now)
            data = line[len("data: "):]
            if data == "[DONE]":
                times["done_s"] = now
                break
            choices = json.loads(data).get("choices") or [{}]
            if (choices[0].get("delta", {}).get("audio") or {}).get("data"):
                times.setdefault("first_audio_s", now)
    return times


def convert_once(client, url: str, wav: bytes, emotion: str) -> float:
    t0 = time.perf_counter()
    response = client.post(url + "/v1/convert", data={"emotion": emotion}, files={"audio": ("in.wav", wav)})
    response.raise_for_status()
    return time.perf_counter() - t0


def together(n: int, fn) -> list:
    """``fn(i)`` on ``n`` threads released at once; results in order."""
    results: list = [None] * n
    start = threading.Barrier(n)

    def run(i: int):
        start.wait()
        results[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def summary(values: list[float]) -> dict:
    a = np.asarray(values)
    return {"median": round(float(np.median(a)), 4), "p90": round(float(np.percentile(a, 90)), 4),
            "min": round(float(a.min()), 4), "max": round(float(a.max()), 4), "n": int(a.size)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", default="qwen_omni")
    p.add_argument("--model", help="checkpoint (default: a tiny random Qwen2.5-Omni, written to a temp folder)")
    p.add_argument("--masks", help="mask file (default: random masks for the tiny model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=3, help="rounds per concurrency (default 3)")
    p.add_argument("--seconds", type=float, default=1.0, help="input length in seconds (default 1)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=50.0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of the server (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--max-audio-tokens", type=int, default=16)
    p.add_argument("--machine", default="", help="what ran it, for the report (e.g. 'the 2-core dev CPU')")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    import httpx
    from esn.serve.server import launch

    with tempfile.TemporaryDirectory() as tmp:
        model, masks = args.model, args.masks
        if model is None:
            model, masks = tiny_model(Path(tmp))
        serve = ["serve", "--adapter", args.adapter, "--model", str(model), "--port", "0", "--device", args.device,
                 "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                 "--queue-size", str(max(64, 2 * max(args.concurrency))), "--threads", str(args.threads),
                 "--max-new-tokens", str(args.max_new_tokens), "--max-audio-tokens", str(args.max_audio_tokens),
                 "--log-level", "warning", *(["--masks", str(masks)] if masks else [])]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        wavs = [speech_wav(args.seconds, i) for i in range(max(args.concurrency))]
        phases = {}
        with launch(serve, env=env) as server, httpx.Client(timeout=600) as probe:
            model_id = probe.get(server.url + "/v1/models").json()["data"][0]["id"]

            stream_once(probe, server.url, model_id, wavs[0], "happy")  # warm-up: both paths once
            convert_once(probe, server.url, wavs[0], "happy")
            for n in args.concurrency:
                clients = [httpx.Client(timeout=600) for _ in range(n)]
                before = batch_histogram(probe, server.url)
                streamed, whole = [], []
                for r in range(args.rounds):
                    def streams(i: int, r: int = r, clients: list = clients) -> dict:
                        return stream_once(clients[i], server.url, model_id, wavs[i], EMOTIONS[(i + r) % 4])

                    def converts(i: int, r: int = r, clients: list = clients) -> float:
                        return convert_once(clients[i], server.url, wavs[i], EMOTIONS[(i + r) % 4])

                    if r % 2:  # alternate which path goes first in a round
                        whole += together(n, converts)
                        streamed += together(n, streams)
                    else:
                        streamed += together(n, streams)
                        whole += together(n, converts)
                after = batch_histogram(probe, server.url)
                for c in clients:
                    c.close()
                phases[f"concurrency_{n}"] = {
                    "clients": n,
                    **{key: summary([t[key] for t in streamed]) for key in ("first_event_s", "first_audio_s", "done_s")},
                    "whole_convert_s": summary(whole),
                    "batch_sizes": {s: after[s] - before.get(s, 0) for s in after if after[s] - before.get(s, 0)},
                }
                print(json.dumps({f"concurrency_{n}": phases[f"concurrency_{n}"]}), file=sys.stderr)
    report = {
        "benchmark": "bench_first_audio", "adapter": args.adapter, "model": str(args.model or "tiny random qwen_omni"),
        "device": args.device,
        "machine": {"name": args.machine, "platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None},
        "settings": {k: getattr(args, k) for k in ("concurrency", "rounds", "seconds", "max_batch", "max_wait_ms",
                                                   "threads", "max_new_tokens", "max_audio_tokens")},
        "streaming": "the adapter returns a conversion whole: the first audio chunk leaves when the row's batch is done",
        "phases": phases,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
