"""Steering overhead: esn.steering vs plain greedy generate, side by side in one process.

    python benchmarks/bench_steering.py                                  # CPU, tiny model
    python benchmarks/bench_steering.py --device cuda --size thinker7b   # H100/H200, 7B thinker sizes

Masks select ``--rate`` (default 0.5%, the paper's r) of all gate neurons at random over every decoder
layer. Variants per batch size, interleaved, each entering its context inside the timed call (one
context per generate, as in an evaluation grid, so building the edit tensors is included):

- ``plain``: greedy generate (baseline); ``noop``: a do-nothing hook per act_fn (the floor of any hook);
- ``steer``: one mask for every row (``steer``, alpha 1); ``steer_a0``: the same with alpha 0;
- ``rows``: a different mask and alpha for every row (``steer_rows``, method steer);
- ``rows_mixed``: a different mask per row, methods cycling steer/add/clamp/deactivate;
- ``folded``: ``steer`` alpha 1 folded into down_proj columns (no hook).

Also reports the tensor ops each hook adds per call (non-view aten ops, about one kernel launch each on
CUDA) and the time to enter each context. Prints JSON; targets (GPU): steer <= 1.02, rows <= 1.03,
folded <= 1.01.
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
from common import (
    SIZES,
    STEER_METHODS,
    OpCounter,
    build_qwen2,
    greedy,
    random_mask,
    random_prompts,
    sync,
    time_side_by_side,
)
from esn.adapters import StreamSpec
from esn.hooks import ModelTarget, gate_hook_points, installed
from esn.steering import Condition, folded, steer, steer_rows


def _ops_per_hook(target, context, batch: int, device: str, dtype) -> dict[str, int]:
    """Non-view ops one steering hook adds to a decode-step call ``[batch, 1, d_mlp]`` of an act_fn
    (the first hook point the context touches)."""
    with context() as names:
        if not names:
            return {}
        act = target.module(names[0])
        x = torch.randn(batch, 1, target.layout()[names[0]].width, device=device, dtype=dtype)
        with torch.inference_mode(), OpCounter() as steered:
            act(x)  # module __call__ runs the forward hooks
    with torch.inference_mode(), OpCounter() as plain:
        act(x)
    return dict(steered.ops - plain.ops)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--new-tokens", type=int, default=None, help="default: 128 on cuda, 32 on cpu")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--rate", type=float, default=0.005, help="fraction of all gate neurons in each mask")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    new_tokens = args.new_tokens or (128 if cuda else 32)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_qwen2(args.size, device=args.device)
    points = gate_hook_points(model, "model.layers", "lm")
    target = ModelTarget(model, points, {"lm": StreamSpec("model")})
    layout = target.layout()
    acts = [target.module(hp) for hp in points]
    mask = random_mask(layout, args.rate, seed=0)

    summary: dict = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "size": args.size,
        "dtype": str(next(model.parameters()).dtype),
        "new_tokens": new_tokens,
        "prompt_len": args.prompt_len,
        "mask_neurons": len(mask),
        "n_neurons": layout.n_neurons,
        "hook_points": len(points),
        "batches": {},
    }
    for batch in [int(b) for b in args.batches.split(",") if b]:
        inputs = random_prompts(model, batch, args.prompt_len, seed=batch)
        row_masks = [random_mask(layout, args.rate, seed=1 + b) for b in range(batch)]
        rows = [Condition(m, "steer", 0.5 + 0.1 * b) for b, m in enumerate(row_masks)]
        mixed = [Condition(m, *STEER_METHODS[b % len(STEER_METHODS)]) for b, m in enumerate(row_masks)]
        contexts = {
            "noop": lambda: installed((m, lambda mod, a, g: None) for m in acts),
            "steer": lambda: steer(target, mask, "steer", 1.0),
            # alpha 0: the same hook work with bit-identical tokens, to tell hook cost from token effects
            "steer_a0": lambda: steer(target, mask, "steer", 0.0),
            "rows": lambda rows=rows: steer_rows(target, rows),
            "rows_mixed": lambda mixed=mixed: steer_rows(target, mixed),
            "folded": lambda: folded(target, mask, "steer", 1.0),
        }

        def run(make=None, inputs=inputs):
            if make is None:
                return greedy(model, inputs, new_tokens)
            with make():
                return greedy(model, inputs, new_tokens)

        variants = {"plain": run} | {name: (lambda make=make: run(make)) for name, make in contexts.items()}
        timings = time_side_by_side(
            variants, baseline="plain", repeats=args.repeats, warmup=args.warmup, device=args.device
        )
        enter_ms = {}
        for name, make in contexts.items():
            sync(args.device)
            t0 = time.perf_counter()
            with make():
                sync(args.device)
                enter_ms[name] = round(1000 * (time.perf_counter() - t0), 3)
        dtype = next(model.parameters()).dtype
        ops = {
            name: _ops_per_hook(target, contexts[name], batch, args.device, dtype)
            for name in ("steer", "rows", "rows_mixed")
        }
        summary["batches"][str(batch)] = {
            "ratios": {name: t["ratio"] for name, t in timings.items()},
            "ratios_paired": {name: t["ratio_paired"] for name, t in timings.items()},
            "ratios_paired_ci90": {name: t["ratio_paired_ci90"] for name, t in timings.items()},
            "ratios_of_min": {
                name: round(t["min_s"] / timings["plain"]["min_s"], 4) for name, t in timings.items()
            },
            "timings": timings,
            "tokens_per_s_plain": round(batch * new_tokens / timings["plain"]["median_s"], 1),
            "enter_ms": enter_ms,
            "ops_per_hook_call": ops,
        }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return summary


if __name__ == "__main__":
    main()
