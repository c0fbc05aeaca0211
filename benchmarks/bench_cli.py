"""CLI start-up: wall time of the light ``esn`` commands, side by side with bare Python and ``import torch``.

    python benchmarks/bench_cli.py                 # 15 rounds, prints JSON
    python benchmarks/bench_cli.py --rounds 30 --out startup.json

Each round runs every command once as a fresh process, in turn (so load on a shared machine hits all
alike), and records the wall time from spawn to exit. Reported per command: median, min and max
seconds, the median as a ratio to bare ``python -c pass``, and whether torch was imported (checked
once, in a separate run under ``-X importtime``, so that the check does not slow the timed runs).
Target: every light command well under 1 s, and none imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS: dict[str, list[str]] = {
    "python -c pass": ["-c", "pass"],
    "esn --version": ["-m", "esn", "--version"],
    "esn --help": ["-m", "esn", "--help"],
    "esn adapters list": ["-m", "esn", "adapters", "list"],
    "esn plugins list": ["-m", "esn", "plugins", "list"],
    "python -c 'import torch'": ["-c", "import torch"],
}
LIGHT = ("esn --version", "esn --help", "esn adapters list", "esn plugins list")


def run_once(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True)
    return time.perf_counter() - start


def imports_torch(args: list[str], env: dict[str, str]) -> bool:
    done = subprocess.run([sys.executable, "-X", "importtime", *args], env=env, capture_output=True, text=True,
                          check=True)
    return any(line.split("|")[-1].strip() == "torch" for line in done.stderr.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    env = {**os.environ, "COLUMNS": "120"}
    for argv in COMMANDS.values():  # warm the page cache and write .pyc files first
        run_once(argv, env)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, argv in COMMANDS.items():
            times[name].append(run_once(argv, env))
    base = statistics.median(times["python -c pass"])
    rows = {}
    for name, argv in COMMANDS.items():
        median = statistics.median(times[name])
        rows[name] = {"median_s": round(median, 3), "min_s": round(min(times[name]), 3),
                      "max_s": round(max(times[name]), 3), "ratio_to_bare_python": round(median / base, 2),
                      "imports_torch": imports_torch(argv, env)}
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average": [round(x, 2) for x in os.getloadavg()]},
        "rounds": args.rounds,
        "commands": rows,
        "light_commands_under_1s": all(rows[c]["median_s"] < 1.0 and not rows[c]["imports_torch"] for c in LIGHT),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
