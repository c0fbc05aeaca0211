"""`esn serve` under load: throughput and latency of concurrent clients vs the same requests sent one by one.

    python benchmarks/bench_serve.py                          # CPU, tiny Qwen2.5-Omni written on the fly
    python benchmarks/bench_serve.py --requests 64 --concurrency 16 --json out.json
    python benchmarks/bench_serve.py --model /ckpt/Qwen2.5-Omni-7B --masks masks.safetensors --device cuda

Starts the real server (``python -m esn serve``, uvicorn, one model thread) on 127.0.0.1 and talks to it
over HTTP with httpx. Two phases on the same server, with the same request list (a different emotion,
mask, method and input per request, cycling):

- ``sequential``: one client, one request at a time (no batching possible);
- ``concurrent``: ``--concurrency`` clients, each sending its next request as soon as the last answered.

Each phase stops after ``--requests`` requests or ``--time-limit`` seconds, whichever comes first (a
request in flight then still finishes). Reports requests/s, latency percentiles (p50/p90/p99) and the
batch sizes the server ran (from /metrics), and the concurrent/sequential throughput ratio. Not a test:
the figures depend on the machine; docs/service.md quotes a run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf

METHODS = (("steer", 1.0), ("add", 0.5), ("clamp", 0.5), ("deactivate", None), ("none", None))
EMOTIONS = ("happy", "angry", "sad", "surprise")


def speech_wav(seconds: float, seed: int, rate: int = 16_000) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * (110 + 17 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, wave.astype(np.float32), rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def request_list(n: int, seconds: float) -> list[dict]:
    out = []
    for i in range(n):
        method, alpha = METHODS[i % len(METHODS)]
        fields = {"emotion": EMOTIONS[i % 4], "method": method}
        if method != "none":
            fields["mask_emotion"] = EMOTIONS[(i // 5) % 4]
        if alpha is not None:
            fields["alpha"] = str(alpha)
        out.append({"fields": fields, "wav": speech_wav(seconds * (0.8 + 0.4 * ((i * 7) % 10) / 10), i)})
    return out


def batch_histogram(client, url: str) -> dict[int, int]:
    cumulative = {}
    for line in client.get(url + "/metrics").text.splitlines():
        m = re.fullmatch(r'esn_batch_size_bucket\{le="([0-9.]+)"\} (\S+)', line)
        if m:
            cumulative[int(float(m.group(1)))] = int(float(m.group(2)))
    sizes = sorted(cumulative)
    return {s: cumulative[s] - (cumulative[sizes[i - 1]] if i else 0) for i, s in enumerate(sizes)}


def phase(url: str, requests: list[dict], clients: int, time_limit: float) -> dict:
    """Send ``requests`` from ``clients`` threads (each takes the next unsent one); stop at the time limit."""
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    next_index = iter(range(len(requests)))
    deadline = time.perf_counter() + time_limit

    def worker():
        with httpx.Client(timeout=600) as client:
            while time.perf_counter() < deadline:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                r = requests[i]
                t0 = time.perf_counter()
                response = client.post(url + "/v1/convert", data=r["fields"], files={"audio": ("in.wav", r["wav"])})
                elapsed = time.perf_counter() - t0
                with lock:
                    if response.status_code == 200:
                        latencies.append(elapsed)
                    else:
                        errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1

    with httpx.Client() as client:
        before = batch_histogram(client, url)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        after = batch_histogram(client, url)
    batches = {s: after[s] - before.get(s, 0) for s in after if after[s] - before.get(s, 0)}
    lat = np.asarray(latencies)
    return {
        "clients": clients, "answered": len(latencies), "errors": errors, "wall_s": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 4) if wall else None,
        "latency_s": {k: round(float(np.percentile(lat, q)), 4) for k, q in (("p50", 50), ("p90", 90), ("p99", 99))}
        | {"mean": round(float(lat.mean()), 4), "max": round(float(lat.max()), 4)} if lat.size else {},
        "batch_sizes": batches,
        "mean_batch": round(sum(s * k for s, k in batches.items()) / max(1, sum(batches.values())), 3),
    }


def tiny_model(folder: Path) -> tuple[Path, Path]:
    """A tiny random Qwen2.5-Omni checkpoint and a mask file of random neurons (2% per emotion) for it."""
    from esn.artifacts import save_masks
    from esn.plugins import registry

    adapter_cls = registry().adapter("qwen_omni")
    checkpoint = adapter_cls.write_tiny(folder / "tiny", seed=0)
    layout = adapter_cls.load(checkpoint).layout()
    rng = np.random.default_rng(0)
    k = max(1, int(0.02 * layout.n_neurons))
    save_masks(folder / "masks.safetensors", {e: rng.choice(layout.n_neurons, k, replace=False) for e in EMOTIONS},
               layout=layout, meta={"selector": "random"})
    return checkpoint, folder / "masks.safetensors"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", default="qwen_omni")
    p.add_argument("--model", help="checkpoint (default: a tiny random Qwen2.5-Omni, written to a temp folder)")
    p.add_argument("--masks", help="mask file (default: random masks for the tiny model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--requests", type=int, default=32, help="requests per phase (default 32)")
    p.add_argument("--concurrency", type=int, default=8, help="clients of the concurrent phase (default 8)")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per phase (default 120)")
    p.add_argument("--seconds", type=float, default=1.0, help="mean input length in seconds (default 1)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=50.0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of the server (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--max-audio-tokens", type=int, default=16)
    p.add_argument("--option", action="append", default=[], help="adapter option KEY=VALUE for the server")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    from esn.serve.server import launch

    with tempfile.TemporaryDirectory() as tmp:
        model, masks = (args.model, args.masks)
        if model is None:
            model, masks = tiny_model(Path(tmp))
        serve = ["serve", "--adapter", args.adapter, "--model", str(model), "--port", "0", "--device", args.device,
                 "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                 "--queue-size", str(max(64, 2 * args.concurrency)), "--threads", str(args.threads),
                 "--max-new-tokens", str(args.max_new_tokens), "--max-audio-tokens", str(args.max_audio_tokens),
                 "--log-level", "warning", *(["--masks", str(masks)] if masks else []),
                 *[x for o in args.option for x in ("--option", o)]]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        requests = request_list(args.requests, args.seconds)
        with launch(serve, env=env) as server:
            print(f"server {server.url}; warming up", file=sys.stderr)
            phase(server.url, requests[:2], 1, args.time_limit)
            results = {}
            for name, clients in (("sequential", 1), ("concurrent", args.concurrency)):
                print(f"{name}: {clients} client(s), up to {args.requests} requests / {args.time_limit:g} s",
                      file=sys.stderr)
                results[name] = phase(server.url, requests, clients, args.time_limit)
                print(json.dumps(results[name]), file=sys.stderr)
    seq, con = results["sequential"]["requests_per_s"], results["concurrent"]["requests_per_s"]
    report = {
        "benchmark": "bench_serve", "adapter": args.adapter, "model": str(args.model or "tiny random qwen_omni"),
        "device": args.device, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                           "python": platform.python_version()},
        "settings": {k: getattr(args, k) for k in ("requests", "concurrency", "time_limit", "seconds", "max_batch",
                                                   "max_wait_ms", "threads", "max_new_tokens", "max_audio_tokens",
                                                   "option")},
        "phases": results,
        "throughput_ratio": round(con / seq, 3) if seq and con else None,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
