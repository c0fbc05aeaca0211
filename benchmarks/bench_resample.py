"""Resampling cost by sample rate: peak memory and time of ``esn.audio.resample`` on 0.3 s of audio.

    python benchmarks/bench_resample.py                      # 8009, 16001, 44101 Hz -> 16 kHz, prints JSON
    python benchmarks/bench_resample.py --rates 8009 44100 --seconds 30 --out resample.json

Before esn 0.1's round-3 fix the filter was sized by the rates' common factors: 0.3 s at 8009 Hz peaked
at 6.3 GB and took 40-66 s. Each rate is measured in a fresh process (so no rate profits from another's
allocations): the peak resident memory that the call adds (``ru_maxrss`` after the call minus before it,
the input already made), the process's whole peak, and the best and median wall time of ``--repeats``
calls. Target: every rate under 200 MB added and under 1 s.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

RATES = (8009, 16001, 44101)
LIMITS = {"peak_mb": 200.0, "seconds": 1.0}

_CHILD = """
import json, resource, statistics, sys, time
import numpy as np
from esn.audio import resample
rate, seconds, repeats, target = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
wave = np.random.default_rng(0).standard_normal(int(seconds * rate)).astype(np.float32) * 0.1
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for _ in range(repeats):
    start = time.perf_counter()
    out = resample(wave, rate, target)
    times.append(time.perf_counter() - start)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rate": rate, "samples_in": wave.size, "samples_out": out.size,
                  "peak_added_mb": round((after - before) / 1024, 2), "process_peak_mb": round(after / 1024, 2),
                  "best_s": round(min(times), 6), "median_s": round(statistics.median(times), 6)}))
"""


def measure(rate: int, seconds: float, repeats: int, target: int) -> dict:
    """One rate in a fresh Python process."""
    done = subprocess.run([sys.executable, "-c", _CHILD, str(rate), str(seconds), str(repeats), str(target)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return {"rate": rate, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    row = json.loads(done.stdout)
    row["ok"] = row["peak_added_mb"] < LIMITS["peak_mb"] and row["median_s"] < LIMITS["seconds"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=int, nargs="+", default=list(RATES))
    parser.add_argument("--seconds", type=float, default=0.3, help="length of the audio (default 0.3 s)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--target", type=int, default=16_000)
    parser.add_argument("--machine", default=platform.node(), help="a name for the machine, kept in the output")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    import soxr

    report = {"benchmark": "resample", "machine": args.machine, "platform": platform.platform(),
              "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
              "soxr": soxr.__version__, "seconds_of_audio": args.seconds, "target_rate": args.target,
              "repeats": args.repeats, "limits": LIMITS,
              "rates": [measure(r, args.seconds, args.repeats, args.target) for r in args.rates]}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if all(r.get("ok") for r in report["rates"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
