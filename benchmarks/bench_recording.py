"""Recording overhead: GateRecorder vs plain greedy generate, side by side in one process.

    python benchmarks/bench_recording.py                                  # CPU, tiny model
    python benchmarks/bench_recording.py --device cuda --size thinker7b   # H100/H200, 7B thinker sizes

Every gate of every decoder layer is recorded (counts, tokens, and moments unless --no-moments) with
padding tracking on (a stop token is watched every step). Variants per batch size, interleaved:
``plain`` (baseline), ``noop`` (a do-nothing forward hook on each act_fn: the floor of any hook
design), ``naive`` (per-step ``counts += (g > 0).sum(1)`` hooks, the design measured at 1.16-1.18x),
and ``GateRecorder`` with each strategy. Also counts the tensor operations each variant adds per decode
step per hook point (non-view aten ops; on CUDA each is about one kernel launch). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SIZES, OpCounter, build_qwen2, greedy, random_prompts, time_side_by_side
from esn.adapters import StreamSpec
from esn.hooks import ModelTarget, gate_hook_points, installed
from esn.recording import STRATEGIES, GateRecorder


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--new-tokens", type=int, default=None, help="default: 128 on cuda, 32 on cpu")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--no-moments", action="store_true", help="record counts and tokens only")
    ap.add_argument("--no-baselines", action="store_true", help="skip the noop and naive hook variants")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument(
        "--clock",
        choices=("wall", "process"),
        default=None,
        help="process = this process's CPU time with one torch thread (default on cpu: shared machines)",
    )
    args = ap.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    new_tokens = args.new_tokens or (128 if cuda else 32)
    strategies = [s for s in args.strategies.split(",") if s]
    clock_name = args.clock or ("wall" if cuda else "process")
    if clock_name == "process":
        torch.set_num_threads(1)  # CPU time then measures this run's work, not other processes' load
    clock = time.process_time if clock_name == "process" else time.perf_counter

    model = build_qwen2(args.size, device=args.device)
    points = gate_hook_points(model, "model.layers", "lm")
    stop = model.config.vocab_size - 1  # watched every step; min_new_tokens keeps it from being generated
    target = ModelTarget(model, points, {"lm": StreamSpec("model", (stop,))})
    acts = [target.module(hp) for hp in points]

    def plain(inputs):
        return greedy(model, inputs, new_tokens)

    def noop(inputs):
        with installed((m, lambda mod, a, g: None) for m in acts):
            return greedy(model, inputs, new_tokens)

    def naive(inputs):
        counts = [None] * len(acts)

        def hook(i):
            def fn(mod, a, g):  # g: [batch, pos, d_mlp]
                c = (g > 0).sum(1, dtype=torch.int32)
                counts[i] = c if counts[i] is None else counts[i].add_(c)

            return fn

        with installed((m, hook(i)) for i, m in enumerate(acts)):
            return greedy(model, inputs, new_tokens)

    def recorder(strategy):
        def run(inputs):
            with GateRecorder(target, strategy=strategy, moments=not args.no_moments) as rec:
                out = greedy(model, inputs, new_tokens)
            rec.stats()  # include the device -> host copy of the statistics
            return out

        return run

    variants = {"plain": plain}
    if not args.no_baselines:
        variants |= {"noop": noop, "naive": naive}
    variants |= {f"recorder_{s}": recorder(s) for s in strategies}

    results = []
    for batch in [int(b) for b in args.batches.split(",")]:
        inputs = random_prompts(model, batch, args.prompt_len)
        ref = plain(inputs)
        ops = {}
        tokens_equal = {}
        for name, fn in variants.items():
            tokens_equal[name] = name == "plain" or torch.equal(fn(inputs), ref)
            if not tokens_equal[name]:
                # On CPU this is a bug. On CUDA, two plain bf16 runs of a random model can already
                # differ (near-tied logits, kernel choice), so it is reported, not fatal.
                message = f"{name} changed the generated tokens at batch {batch}"
                if not cuda:
                    raise SystemExit(message)
                print(f"warning: {message} (CUDA runs are not bit-reproducible)", file=sys.stderr)
            counter = OpCounter()
            with counter:
                fn(inputs)
            ops[name] = sum(counter.ops.values())
        timing = time_side_by_side(
            {name: (lambda fn=fn, inputs=inputs: fn(inputs)) for name, fn in variants.items()},
            baseline="plain",
            repeats=args.repeats,
            warmup=args.warmup,
            device=args.device,
            clock=clock,
        )
        # decode steps = new_tokens - 1 (the prefill produces the first token)
        per = max(1, (new_tokens - 1) * len(acts))
        for name, t in timing.items():
            results.append(
                {
                    "batch": batch,
                    "variant": name,
                    **t,
                    "tok_per_s": round(batch * new_tokens / t["median_s"], 1),
                    "extra_ops_per_hook_step": round((ops[name] - ops["plain"]) / per, 2),
                    "tokens_equal": tokens_equal[name],
                }
            )

    summary = {
        "benchmark": "recording",
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "size": args.size,
        "dtype": str(next(model.parameters()).dtype),
        "hook_points": len(acts),
        "new_tokens": new_tokens,
        "prompt_len": args.prompt_len,
        "repeats": args.repeats,
        "clock": clock_name,
        "moments": not args.no_moments,
        "results": results,
    }
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return summary


if __name__ == "__main__":
    main()
