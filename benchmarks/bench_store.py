"""The record store at paper scale: bytes per attempt, `esn select` time and peak memory, before and after.

    python benchmarks/bench_store.py --out result.json                          # 4,800 attempts, 7B sizes
    python benchmarks/bench_store.py --before-src /tmp/esn-old/core/src --out result.json   # "before" = older esn
    python benchmarks/bench_store.py --size tiny --attempts 96 --distinct 2       # smoke test, seconds

A synthetic record store of ``--attempts`` identification attempts (sources x the paper's 4 targets, in the
record stage's order, shards of ``--batch``) at Qwen2.5-Omni-7B sizes: 28 thinker layers (``lm``) and 24
talker layers (``synth``) of 18,944 gate neurons, 985,088 in all. Per attempt, the positions follow the
realistic mix of #27: text 16-96 generated tokens, codec 4-6 per text token, inputs 1.5-6 s (25 audio
tokens a second plus a 60-token prompt; the talker's prompt is the thinker's whole sequence). Each neuron
has a base rate ~ Beta(2, 3), 1% of neurons per emotion +0.15 under it; counts are binomial draws (prompt
and generated apart), sums and sums of squares float32 values of the same magnitude as a gate's.

Variants, each written as the record stage writes it and selected by the select stage's own code
(``esn.pipeline.select.select``: the paper's grid, CAS anchor r = 0.5% c = 50, Table 3's five selectors,
rates 0.1/0.3/1%, c 10/20/100, the generated-positions ablation; both streams):

- ``before``: what every record wrote until now: raw shards (``esn-shard/1``) with moments, and select
  aggregating one statistics key after the other (each re-reads its shards). With ``--before-src`` this
  variant runs the given older esn source tree (e.g. ``git archive <commit> core/src``): today's code
  as it was, not a re-enactment.
- ``after``: the new default: no moments (no built-in selector takes them), counts compressed row by row
  (``esn-shard/2``), select aggregating every key in one pass that decodes only the rows it needs.
- ``after_moments`` (bytes only): compressed with moments, what a moment-taking selector would store.

Only ``--distinct`` shards per variant are generated and written through ``AttemptStore.append`` (their
write time is reported per attempt); the other shards are hard links to them with their own sidecars
(ids, records), so a 4,800-attempt store costs 1.9 GB of disk before and 0.3 GB after instead of 57 and
9.7 GB. Consequence, stated in the result: every read is from the page cache, so ``select`` times are
CPU time (checksums, decoding, sums) and exclude disk reads; ``bytes_read`` says what a cold disk would
have to deliver. Each select runs in its own process (peak RSS from ``getrusage``); the masks of every
variant are compared byte for byte. Prints JSON, then a plain-text table last.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGETS = ["happy", "angry", "sad", "surprise"]
SIZES = {"7b": ((28, 18944), (24, 18944)), "tiny": ((4, 512), (2, 512))}
PAPER = {"seed": 0, "model": {"adapter": "qwen_omni", "source": "synthetic", "streams": ["lm", "synth"]},
         "judges": {"emotion": [{"name": "stand_in"}]},
         "record": {"targets": TARGETS, "batch_size": 20},
         "filter": {"tau_wer": 0.15, "require_match": True},
         "anchor": {"selector": "cas", "rate": 0.005, "c": 50},
         "sweep": {"selectors": ["random", "lap", "lape", "mad", "cas"], "rates": [0.001, 0.003, 0.01],
                   "c": [10, 20, 100], "alphas": [], "interventions": []},
         "selectors": {"lape": {"quantile": 0.95}, "random": {"shared": False}}}


def layout(size: str):
    from esn.hookpoints import HookPoint, Layout

    (lm_layers, lm_w), (syn_layers, syn_w) = SIZES[size]
    return Layout([HookPoint("lm", i, lm_w, f"thinker.{i}") for i in range(lm_layers)]
                  + [HookPoint("synth", i, syn_w, f"talker.{i}") for i in range(syn_layers)])


def positions(rng: np.random.Generator, b: int, lay) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, prompt_tokens) [b, H]`` of the realistic mix: per attempt one thinker and one talker length."""
    text = rng.integers(16, 97, size=b)
    codec = (text * rng.uniform(4, 6, size=b)).astype(np.int64)
    prompt = 60 + (rng.uniform(1.5, 6, size=b) * 25).astype(np.int64)
    lm = np.array([hp.stream == "lm" for hp in lay])
    tokens = np.where(lm, (prompt + text)[:, None], (prompt + text + codec)[:, None])
    prompt_tokens = np.where(lm, prompt[:, None], (prompt + text)[:, None])
    return tokens, prompt_tokens


def template(rng: np.random.Generator, b: int, lay, base: np.ndarray, lift: np.ndarray) -> dict:
    """One shard's statistics: row j targets TARGETS[j % 4]."""
    tokens, prompt_tokens = positions(rng, b, lay)
    widths = lay.group_widths
    t_all, t_prompt = np.repeat(tokens, widths, axis=1), np.repeat(prompt_tokens, widths, axis=1)
    rate = np.clip(base[None, :] + lift[np.arange(b) % 4] + rng.normal(0, 0.03, size=(b, 1)), 0, 1)
    prompt_counts = rng.binomial(t_prompt, rate).astype(np.uint16)
    counts = prompt_counts + rng.binomial(t_all - t_prompt, rate).astype(np.uint16)
    sums = (counts * rng.uniform(0.2, 0.6, size=counts.shape)).astype(np.float32)
    sumsq = (sums * rng.uniform(0.1, 0.5, size=counts.shape)).astype(np.float32)
    return {"counts": counts, "tokens": tokens, "prompt_counts": prompt_counts, "prompt_tokens": prompt_tokens,
            "sums": sums, "sumsq": sumsq}


def records(k: int, b: int, rng: np.random.Generator) -> list[dict]:
    """The records of shard ``k``: sources ``k*b/4 ...`` x the 4 targets; about 45% are successes."""
    out = []
    for j in range(b):
        src, target = (k * b + j) // 4, TARGETS[j % 4]
        heard = target if rng.random() < 0.55 else "neutral"
        text = "she said it twice" if rng.random() < 0.85 else "he sat on it"
        out.append({"id": f"src{src:05d}|{target}", "emotion": target, "transcript": "she said it twice",
                    "text": text, "meta": {"label": heard, "labels": {"stand_in": heard}, "wer": None}})
    return out


def build(root: Path, variant: str, args, templates: list[dict], lay) -> dict:
    """Write the variant's store under ``root/record`` (``--distinct`` real shards, the rest linked)."""
    from esn.store import AttemptStore

    store = AttemptStore(root / "record", lay, architecture="Synthetic")
    moments, compress = {"before": (True, False), "after": (False, True), "after_moments": (True, True)}[variant]
    rng = np.random.default_rng(args.seed + 7)
    n_shards = args.attempts // args.batch
    t_write, sizes = 0.0, []
    for k in range(min(n_shards, len(templates))):
        st = dict(templates[k])
        if not moments:
            st.pop("sums"), st.pop("sumsq")
        t0 = time.perf_counter()
        side = store.append(records(k, args.batch, rng), worker=f"b{k:06d}", compress=compress, **st)
        t_write += time.perf_counter() - t0
        sizes.append(side.stat().st_size + side.with_suffix(".safetensors").stat().st_size)
    if variant == "after_moments":
        return {"bytes_per_attempt": float(np.mean(sizes)) / args.batch,
                "write_s_per_attempt": t_write / (len(sizes) * args.batch)}
    for k in range(len(templates), n_shards):  # the other shards: the same tensors, their own records
        src = store.shard_dir / f"b{k % len(templates):06d}-000000"
        dst = store.shard_dir / f"b{k:06d}-000000"
        os.link(src.with_suffix(".safetensors"), dst.with_suffix(".safetensors"))
        side = json.loads(src.with_suffix(".json").read_text())
        side |= {"tensors": dst.name + ".safetensors", "records": records(k, args.batch, rng)}
        dst.with_suffix(".json").write_text(json.dumps(side, ensure_ascii=False))
    sidecars = [p.stat().st_size for p in store.shard_dir.glob("*.json")]
    return {"bytes_per_attempt": float(np.mean(sizes)) / args.batch,
            "tensor_bytes_per_attempt": float(np.mean(sizes) - np.mean(sidecars)) / args.batch,
            "write_s_per_attempt": t_write / (len(sizes) * args.batch),
            "store_bytes_if_distinct": int(n_shards * np.mean(sizes))}


def config(root: Path) -> Path:
    """A run directory around the store, as `esn run` would have made it (manifest, config file)."""
    csv = root.parent / f"{root.name}.csv"  # select reads no source
    csv.write_text("path,transcript,speaker,split\n")
    cfg = {**PAPER, "run_dir": str(root), "data": {"kind": "csv", "root": str(csv)}}
    path = root.parent / f"{root.name}.json"
    path.write_text(json.dumps(cfg))
    return path


def child(args) -> None:
    """One select in this process: seconds, peak RSS, shards/bytes read, mask digests (JSON on stdout)."""
    import resource

    from esn.pipeline import select
    from esn.pipeline.config import parse_config
    from esn.pipeline.run import Run
    from esn.store import AttemptStore

    path = Path(args.child)
    run = Run(parse_config(json.loads(path.read_text()), base=path.parent))
    loads: list[int] = []
    load = AttemptStore._load

    def counted(self, shard, *a, **k):  # what select reads: one entry per shard file read
        loads.append(shard.size)
        return load(self, shard, *a, **k)

    AttemptStore._load = counted
    if args.per_key and hasattr(select._Stats, "prefetch"):
        select._Stats.prefetch = lambda self, recipes: None  # the older path: one aggregate per key
    with run:
        t0, c0 = time.perf_counter(), time.process_time()
        select.select(run)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    masks = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rundir.select.glob("masks_*"))}
    # VmHWM: this process's own high-water mark (ru_maxrss would include the parent's RSS at fork)
    hwm = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:")) if Path("/proc/self/status").exists() else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"select_s": seconds, "select_cpu_s": cpu, "peak_rss_mb": hwm / 1024,
                      "shard_reads": len(loads), "bytes_read": int(sum(loads)), "masks": masks,
                      "esn": str(Path(select.__file__).parents[2])}))


def run_select(path: Path, variant: str, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if variant == "before" and args.before_src:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(args.before_src).resolve()), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, __file__, "--child", str(path)] + (["--per-key"] if variant == "before" else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"select of {variant} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="7b")
    ap.add_argument("--attempts", type=int, default=4800)
    ap.add_argument("--batch", type=int, default=20, help="attempts per shard (the record batch)")
    ap.add_argument("--distinct", type=int, default=8, help="shards generated; the others link to them")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each select")
    ap.add_argument("--before-src", help="an older esn source tree (its core/src) to run the 'before' select with")
    ap.add_argument("--workdir", default=None, help="where the stores go (default: a temp folder, removed after)")
    ap.add_argument("--out", default=None, help="write the JSON result here too")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--per-key", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.attempts % args.batch or args.batch % 4:
        raise SystemExit("--attempts must be a multiple of --batch, and --batch of 4 (targets)")
    lay = layout(args.size)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="esn-bench-store-"))
    need = args.distinct * args.batch * lay.n_neurons * 14
    free = shutil.disk_usage(work).free
    if need > free * 0.8:
        raise SystemExit(f"{work}: {need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free")
    result = {"machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "processor": platform.processor() or platform.machine(),
                          "load_avg_before": os.getloadavg()},
              "size": args.size, "neurons": lay.n_neurons, "attempts": args.attempts, "batch": args.batch,
              "distinct_shards": args.distinct, "reads": "page cache (hard-linked shards): CPU time only",
              "variants": {}}
    try:
        t0 = time.perf_counter()
        rng = np.random.default_rng(args.seed)
        base = rng.beta(2, 3, size=lay.n_neurons)
        lift = np.zeros((4, lay.n_neurons))
        for e in range(4):
            lift[e, rng.choice(lay.n_neurons, lay.n_neurons // 100, replace=False)] = 0.15
        templates = [template(rng, args.batch, lay, base, lift) for _ in range(min(args.distinct,
                                                                                    args.attempts // args.batch))]
        result["generate_s"] = time.perf_counter() - t0
        from esn.pipeline.config import parse_config
        from esn.pipeline.run import Run

        paths = {}
        for variant in ("before", "after", "after_moments"):
            root = work / variant
            paths[variant] = config(root)
            with Run(parse_config(json.loads(paths[variant].read_text()), base=work)):  # the manifest, as `esn run` writes it
                pass
            result["variants"][variant] = build(root, variant, args, templates, lay)
            if variant == "after_moments":
                shutil.rmtree(root)
        del templates  # the selects' processes start without the parent's memory in their peak
        for variant in ("before", "after"):
            result["variants"][variant] |= run_select(paths[variant], variant, args)
            entry = result["variants"][variant]
            print(variant, json.dumps({k: v for k, v in entry.items() if k != "masks"}), file=sys.stderr, flush=True)
        before, after = result["variants"]["before"], result["variants"]["after"]
        result["masks_identical"] = before["masks"] == after["masks"]
        result["n_masks"] = len(after["masks"])
        result["ratios_after_to_before"] = {k: after[k] / before[k] for k in
                                            ("bytes_per_attempt", "select_s", "select_cpu_s", "peak_rss_mb", "bytes_read")
                                            if k in before and k in after}
        result["machine"]["load_avg_after"] = os.getloadavg()
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(f"\n{'variant':<14} {'MB/attempt':>10} {'write s/att':>11} {'select s':>9} {'cpu s':>7} {'peak MB':>8} "
          f"{'GB read':>8}")
    for name, v in result["variants"].items():
        sel = (f"{v['select_s']:>9.1f} {v.get('select_cpu_s', float('nan')):>7.1f} {v['peak_rss_mb']:>8.0f} "
               f"{v['bytes_read'] / 1e9:>8.2f}" if "select_s" in v else f"{'-':>9} {'-':>7} {'-':>8} {'-':>8}")
        print(f"{name:<14} {v['bytes_per_attempt'] / 1e6:>10.3f} {v['write_s_per_attempt']:>11.4f} {sel}")
    print(f"masks identical: {result['masks_identical']} ({result['n_masks']} files)")
    if not result["masks_identical"]:
        raise SystemExit("the selections differ")


if __name__ == "__main__":
    main()
