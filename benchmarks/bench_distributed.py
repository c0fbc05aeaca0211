"""`esn run` on one device vs `torchrun --nproc-per-node N -m esn run` on N, in one run on one host.

    python benchmarks/bench_distributed.py --size tiny --device cpu --out /tmp/bench      # any machine
    python benchmarks/bench_distributed.py --size 7b --device cuda --ranks 2 --out $OUT    # two H200s

Needs the benchmark plugins (`pip install benchmarks/random_weights`): the study's model is the adapter
`qwen_omni_random`, i.e. QwenOmniAdapter with seeded random weights at Qwen2.5-Omni-7B sizes built on
each rank's GPU (no checkpoint to read: its folder holds config.json, the tokenizer and the speakers),
and its emotion judge is the numpy `stand_in` (funasr is not on the GPU machines). Everything else is
the product's own path: the pipeline, its batch claiming, recording, per-row steering, batched token2wav.

The 7b study: synthetic 3 s neutral sources (esn.pipeline.synthetic), record 16 batches of 20
conversions (80 sources x 4 targets), select (CAS, r = 0.5%; every attempt passes the filter: random
weights), evaluate 12 batches of 20 (baseline and the anchor's 4 x 4 grid on 12 sources: different masks
per row). Fixed work per conversion: 16 text and 96 codec tokens (min = max), 10 ODE steps, token2wav
batched by 20 with TF32. The same study runs first as one process on the first device, then as N ranks
on N devices (torchrun's default OMP_NUM_THREADS=1 per rank, as users get it). Both runs go through
`esn -v run`, and everything below is what the pipeline itself prints: a stage's conversions/s over the
time from the group's start barrier (models loaded) to the barrier after the last batch; the same from
the moment every rank has finished its first batch (which carries the process's CUDA warm-up); each
rank's median seconds per batch of generate, collect (statistics to the host), judge, store (the
shard's write, on the background writer in record) and wait (for the writer); and every batch's times
(the -v log). Reports both runs, the ratios, whether the masks are byte-identical, which other files
differ, and the progress bars rank 0 printed. Writes ``bench_distributed.json`` under --out after each
run, the logs beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

STAGES = ("record", "evaluate")
# Record: `record_speakers` x `per_speaker` sources x 4 targets; evaluate: `eval_sources` x 20 grid cells
# (baseline + the anchor's 4 x 4); batches of 20 cut both into an even number of equal batches.
SIZES = {
    "tiny": dict(rate=0.05, record_speakers=2, per_speaker=5, eval_sources=4, batch=20, text=6, codec=12, seconds=0.5),
    "7b": dict(rate=0.005, record_speakers=5, per_speaker=16, eval_sources=12, batch=20, text=16, codec=96, seconds=3.0),
}


def study_toml(size: str, device: str) -> str:
    s = SIZES[size]
    options = {"thinker_min_new_tokens": s["text"], "talker_min_new_tokens": s["codec"], "token2wav_num_steps": 10}
    if device == "cuda":
        options |= {"token2wav_batch": s["batch"], "token2wav_tf32": True}
    opts = ", ".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
    speakers = ", ".join(f'"{11 + i:04d}"' for i in range(s["record_speakers"]))
    test = ", ".join(f'"{11 + s["record_speakers"] + i:04d}"' for i in range(2))
    return f"""
seed = 0
[model]
adapter = "qwen_omni_random"
source = "checkpoint"
device = "{device}"
[generation]
max_new_tokens = {s["text"]}
max_audio_tokens = {s["codec"]}
options = {{{opts}}}
[data]
root = "esd"
splits.identification = [{{speakers = [{speakers}], first = 1, last = {s["per_speaker"]}}}]
splits.test_seen = [{{speakers = [{test}], first = 1, last = {s["eval_sources"] // 2}}}]
[judges]
emotion = [{{name = "stand_in"}}]
[record]
batch_size = {s["batch"]}
[filter]
require_match = false
tau_wer = 1000.0
[anchor]
rate = {s["rate"]}
[sweep]
selectors = ["cas"]
[evaluate]
splits = ["test_seen"]
batch_size = {s["batch"]}
bootstrap = 100
"""


def make_study(root: Path, size: str, device: str) -> Path:
    from esn.pipeline.synthetic import write_esd
    from esn_bench_random import write_random_checkpoint

    s = SIZES[size]
    if size == "7b":
        from bench_qwen_omni import config_7b

        config = config_7b()
    else:
        from esn_qwen_omni.tiny import tiny_config

        config = tiny_config()
    write_random_checkpoint(root / "checkpoint", config)
    n = max(s["per_speaker"], s["eval_sources"] // 2)
    write_esd(root / "esd", speakers=range(11, 13 + s["record_speakers"]), indices=range(1, n + 1),
              emotions=["neutral"], seconds=s["seconds"])
    (root / "study.toml").write_text(study_toml(size, device))
    return root / "study.toml"


RATE = re.compile(r"^(record|evaluate)(?: \((\d+) ranks\))?: (\d+) conversions in ([\d.]+) s, ([\d.]+) conversions/s"
                  r"(?:; after every rank's first batch ([\d.]+) conversions/s)?")
STEPS = re.compile(r"^(record|evaluate)(?: rank (\d+))?: (\d+) batches; median s per batch: (.*)$")
BATCH = re.compile(r"^esn\.pipeline\.parallel: (record|evaluate) batch: rank (\d+) #(\d+), claimed ([\d.]+) s, "
                   r"done ([\d.]+) s, (\d+) conversions; (.*)$")
BAR = re.compile(r"^(record|evaluate)\b.*\d+/\d+ batches.*ETA")


def _steps(text: str) -> dict[str, float]:
    """``generate 5.10, store 2.31`` -> {"generate": 5.1, "store": 2.31}."""
    return {name: float(value) for name, value in (part.rsplit(" ", 1) for part in text.split(", "))}


def parse(text: str) -> dict:
    """Stage throughputs, each rank's median step times, every batch's times, and the progress bars, from
    the output of one `esn -v run` (rank 0's, for a group)."""
    out: dict = {"bars": []}
    for line in text.splitlines():
        line = line.strip()
        if m := RATE.match(line):
            out[m[1]] = {"conversions": int(m[3]), "seconds": float(m[4]), "conversions_per_s": float(m[5]),
                         "after_first_batch_conversions_per_s": None if m[6] is None else float(m[6]),
                         "ranks": {}, "batches": []}
        elif (m := STEPS.match(line)) and m[1] in out:
            out[m[1]]["ranks"][int(m[2] or 0)] = {"batches": int(m[3]), "median_s": _steps(m[4])}
        elif (m := BATCH.match(line)) and m[1] in out:
            out[m[1]]["batches"].append({"rank": int(m[2]), "claimed_s": float(m[4]), "done_s": float(m[5]),
                                         "conversions": int(m[6]), "s": _steps(m[7])})
        elif BAR.match(line):
            out["bars"].append(line)
    return out


def run(cmd: list[str], env: dict[str, str], log: Path, wanted: list[str]) -> dict:
    """Run one `esn run` with its output going to ``log`` as it comes (a run cut short keeps it there);
    return its stage throughputs, step and batch times, and wall time."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    text = log.read_text()
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}):\n{text[-3000:]}")
    out = {"wall_s": round(wall, 1), **parse(text)}
    missing = [s for s in wanted if s not in out]
    if missing:
        raise SystemExit(f"no throughput line for {missing} in the output of {' '.join(cmd)} (see {log})")
    return out


def differing(a: Path, b: Path) -> tuple[list[str], int]:
    """Files of run directories ``a`` and ``b`` whose bytes differ (locks and manifest aside), and how many
    were compared."""
    names = sorted({p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()}
                   | {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()})
    names = [n for n in names if not n.startswith(".lock") and n != "manifest.json"]
    diff = [n for n in names if not (a / n).is_file() or not (b / n).is_file()
            or (a / n).read_bytes() != (b / n).read_bytes()]
    return diff, len(names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True, help="study, run directories, logs and the JSON")
    ap.add_argument("--stages", default="record,select,evaluate", help="the stages to time (record alone: record)")
    ap.add_argument("--threads-share", action="store_true", help="give each rank OMP_NUM_THREADS = cores / ranks "
                    "(as `esn run --workers` does) instead of torchrun's 1")
    ap.add_argument("--json", type=Path, help="where to write the JSON (default: --out/bench_distributed.json)")
    args = ap.parse_args()

    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    result_path = args.json or args.out / "bench_distributed.json"
    logs = result_path.parent
    config = make_study(args.out / "study", args.size, args.device)
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    cuda = args.device == "cuda"
    result: dict = {
        "size": args.size, "device": args.device, "ranks": args.ranks, "study": study_toml(args.size, args.device),
        "torch": torch.__version__, "python": sys.version.split()[0],
        "card": torch.cuda.get_device_name(0) if cuda else "cpu", "gpus": torch.cuda.device_count() if cuda else 0,
        "rank_omp_threads": (max(1, (os.cpu_count() or 1) // args.ranks) if args.threads_share else 1) if cuda else None,
    }

    def save() -> None:
        result_path.write_text(json.dumps(result, indent=1) + "\n")

    esn = [sys.executable, "-m", "esn", "-v"]  # -v: every batch's times in the log
    stages = [st for st in STAGES if st in args.stages.split(",")]
    common = [str(config), "--stages", args.stages] + ([] if cuda else ["--threads", "1"])
    one_env = {**env, "CUDA_VISIBLE_DEVICES": "0"} if cuda else env
    print(f"one process: {args.size} on {args.device}", file=sys.stderr, flush=True)
    result["one"] = run([*esn, "run", *common, "--run-dir", str(args.out / "one")], one_env, logs / "one.log", stages)
    save()
    print(json.dumps({s: result["one"][s]["conversions_per_s"] for s in stages}), file=sys.stderr, flush=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}", "-m",
                "esn", "-v"]
    many_env = {**env, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(args.ranks)))} if cuda else env
    if cuda and args.threads_share:  # what `esn run --workers N` sets: each rank its share of the cores
        many_env = {**many_env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.ranks))}
    print(f"{args.ranks} ranks under torchrun", file=sys.stderr, flush=True)
    result["ranks_run"] = run([*launcher, "run", *common, "--run-dir", str(args.out / "many")], many_env,
                              logs / "many.log", stages)

    def ratio(key: str) -> dict[str, float]:
        one, many = result["one"], result["ranks_run"]
        return {s: round(many[s][key] / one[s][key], 3) for s in stages if one[s][key] and many[s][key]}

    result["ratio"] = ratio("conversions_per_s")
    result["ratio_after_first_batch"] = ratio("after_first_batch_conversions_per_s")
    diff, compared = differing(args.out / "one", args.out / "many")
    result["files_compared"] = compared
    result["files_differing"] = diff
    result["masks_identical"] = not any(n.startswith("select/masks_") for n in diff) and any(
        (args.out / "one" / "select").glob("masks_*.safetensors"))
    save()
    print(json.dumps({k: result[k] for k in ("ratio", "ratio_after_first_batch", "masks_identical", "files_differing")},
                     indent=1))


if __name__ == "__main__":
    main()
