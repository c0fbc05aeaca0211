"""CUDA-graph decode: what esn hooks cost the GPU itself, and how much faster a graph step is than eager.

    python benchmarks/bench_graph_decode.py --device cuda --size thinker7b --batches 1,16
    python benchmarks/bench_graph_decode.py --device cpu --size tiny --repeats 2 --steps 8   # smoke test

Eager decoding of a 7B decoder is launch-bound (~25 ms of Python and kernel launches per step), so a
hook's cost drowns in host noise. Here one greedy decode step over a transformers ``StaticCache`` reads
only static device buffers, is captured as one ``torch.cuda.CUDAGraph`` per variant (with the esn
context open during warm-up and capture), and runs of ``--steps`` replays are timed with CUDA events.

Context lifetime: a replay needs no hook installed (the graph holds the hook's kernels), only the
tensors those kernels read. So each context is exited right after its capture (the next variant's
capture must see only its own hooks, and rounds interleave all graphs), and the hook functions are
kept referenced so their edit/count tensors stay allocated. ``folded`` restores the weights on exit:
its graph then replays the same kernels on the original weights (same cost; its tokens were checked
while folded). Eager runs enter their context around each run, outside the timed span.

Variants (``--rate`` of all gate neurons per mask, as in bench_steering):

- ``plain``: no hook (baseline); ``noop``: a do-nothing forward hook on every act_fn;
- ``steer``: ``esn.steering.steer`` alpha 1; ``folded``: the same folded into ``down_proj`` columns;
- ``rows``: ``steer_rows``, a different mask and alpha per row; ``rows_mixed``: methods cycling
  steer/add/clamp/deactivate (both only for batch > 1);
- ``count``: a graph-safe recorder, ``counts[h] += (g > 0).sum(pos)`` into a preallocated ``[B, D]`` int32;
- ``chunk_copy``: the per-step work of ``GateRecorder``'s default strategy (one copy per hook point into
  its chunk buffer); the full-chunk flush is timed on its own and added per step (``recorder_chunk``).

Rounds interleave the variants in a rotating order; each variant's runs are compared with ``plain``'s of
the same round (paired ratio, bootstrap 90% interval). The first ``--eager-repeats`` rounds also time the
same step run eagerly (``plain@eager``, ``steer@eager``: graph speed-up per step) and HF ``generate``
(the everyday baseline, ms per token). Tokens: graph replays vs the same steps run eagerly (CUDA, bf16:
reported), and the static-cache path vs ``generate`` (CPU float32: asserted equal for plain and steer).
On CPU there are no graphs: every variant's eager static-cache step is timed instead (smoke test).
Prints JSON, then a plain-text table last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    SIZES,
    STEER_METHODS,
    OpCounter,
    build_qwen2,
    greedy,
    paired_ratio,
    random_mask,
    random_prompts,
)
from esn.adapters import StreamSpec
from esn.hooks import ModelTarget, gate_hook_points, installed
from esn.recording import GateRecorder, _Point
from esn.steering import Condition, folded, steer, steer_rows

NO_GRAPH = "CUDA graphs need --device cuda"
# aten ops that read a device value on the host (.item(), bool(t), data-dependent shapes): each one is a
# sync in eager mode and makes stream capture fail.
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "is_nonzero", "aten.equal")


class StepSpy(OpCounter):
    """Counts a step's non-view ops (about one kernel launch each on CUDA) and notes the suspects for
    capture: host syncs, and on CUDA ops that read a host tensor (a pageable copy inside the graph)."""

    def __init__(self, cuda: bool):
        super().__init__()
        self.cuda = cuda
        self.suspects: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if any(s in name for s in SYNC_OPS):
            self.suspects[name] += 1
        elif self.cuda and any(
            isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() > 0
            for t in tree_leaves((args, kwargs or {}))
        ):
            self.suspects[f"{name} (host tensor)"] += 1
        return super().__torch_dispatch__(func, types, args, kwargs)



def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Decoder:
    """Greedy decoding over a ``StaticCache`` whose every step reads static device buffers only.

    Buffers: ``ids [B, 1]`` (the step writes its argmax back here, so it feeds itself),
    ``cache_position [1]`` and ``position_ids [B, 1]`` (set between steps by ``copy_`` from the
    precomputed schedule ``[steps, 1]`` / ``[steps, B, 1]``), and the attention mask, built inside the
    step as ``arange(max_len) <= cache_position`` ``[B, 1, 1, max_len]``.

    transformers 5.24 internals relied on (paths under transformers/):
    - masking_utils.py:818 (``_preprocess_mask_arguments``): a 4D mask is returned as given, so no
      host-side mask logic runs inside the step;
    - cache_utils.py:481-487 (``StaticLayer.update``): there is no ``cache_position`` argument any more;
      each layer writes at its own device counter ``cumulative_length`` (a 0-d tensor, static address since
      ``lazy_initialization`` at the first prefill) and advances it with ``add_`` - inside the graph, so
      replays advance it on their own. ``reset`` puts every counter back to ``prompt_len`` before each run;
      the schedule keeps ``cache_position`` (used for the mask only) equal to it, checked after each check
      run (``cache_counters_ok``);
    - integrations/sdpa_attention.py:121 (``pack_gqa``): with one query token and a ``[B, 1, 1, L]`` mask,
      GQA runs without ``repeat_kv`` and the mask broadcasts over heads;
    - modeling_rope_utils.py:122 (``dynamic_rope_update``): no host logic for the default rope type.
    """

    def __init__(self, model, batch: int, prompt_len: int, steps: int):
        from transformers import StaticCache

        self.model = model
        self.batch, self.prompt_len, self.steps = batch, prompt_len, steps
        self.max_len = prompt_len + steps
        device = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_len)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.kv_index = torch.arange(self.max_len, device=device)  # [max_len]
        pos = prompt_len + torch.arange(steps, device=device)
        self.schedule_cp = pos.view(steps, 1).clone()  # [steps, 1]
        self.schedule_pos = pos.view(steps, 1, 1).expand(steps, batch, 1).clone()  # [steps, B, 1]

    def _set_counters(self, value: int) -> None:
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.cumulative_length.fill_(value)

    def counters(self) -> list[int]:
        return [int(layer.cumulative_length) for layer in self.cache.layers]

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ``[B, P]`` (eager, causal 4D mask); returns the first greedy token ``[B, 1]``."""
        p = self.prompt_len
        self._set_counters(0)
        q = torch.arange(p, device=self.kv_index.device)
        mask = (self.kv_index[None, :] <= q[:, None]).view(1, 1, p, self.max_len).expand(self.batch, 1, p, -1)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=q.expand(self.batch, p),
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1:].argmax(-1)

    def reset(self, first: torch.Tensor) -> None:
        """Back to the state right after prefill: next write at ``prompt_len``, feeding ``first``."""
        self._set_counters(self.prompt_len)
        self.ids.copy_(first)
        self.cache_position.fill_(self.prompt_len)
        self.position_ids.fill_(self.prompt_len)

    def step(self) -> None:
        """One greedy decode step; no host sync, no branch on tensor values (graph-capturable)."""
        mask = (self.kv_index <= self.cache_position).view(1, 1, 1, self.max_len).expand(self.batch, 1, 1, -1)
        out = self.model(
            input_ids=self.ids,
            attention_mask=mask,  # [B, 1, 1, max_len] bool, True = attend
            position_ids=self.position_ids,
            cache=self.cache,
            use_cache=True,
        )
        self.ids.copy_(out.logits[:, -1:].argmax(-1))

    def run(self, n: int, replay: Callable[[], None] | None = None, collect: bool = False) -> torch.Tensor | None:
        """``n`` steps from the current state (graph replays if ``replay``); the tokens ``[B, n]`` if ``collect``."""
        tokens = []
        for i in range(n):
            self.cache_position.copy_(self.schedule_cp[i])
            self.position_ids.copy_(self.schedule_pos[i])
            if replay is None:
                self.step()
            else:
                replay()
            if collect:
                tokens.append(self.ids.clone())
        return torch.cat(tokens, dim=1) if collect else None


def capture(dec: Decoder, first: torch.Tensor, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """Warm the step up on a side stream (as the torch docs require), then capture one step."""
    dec.reset(first)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dec.run(warmup)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dec.step()
    torch.cuda.synchronize()
    return graph


def _hook_refs(model: torch.nn.Module) -> list:
    """The hook functions installed now. A graph replays kernels that read the hooks' tensors (edit
    scales, count buffers) by address; holding the functions keeps those tensors alive after the context
    that made them has exited."""
    return [fn for m in model.modules() for hooks in (m._forward_hooks, m._forward_pre_hooks) for fn in hooks.values()]


def _timer(cuda: bool) -> Callable[[Callable[[], object]], float]:
    """Seconds one call takes: CUDA events on the current stream (GPU time), else wall clock."""

    def timed(fn: Callable[[], object]) -> float:
        if not cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000

    return timed


def _stats(times: dict[str, list[float]], baseline: str, per: int) -> dict[str, dict]:
    """Median/min ms per step (``per`` steps a run), ratio of medians and paired ratio vs ``baseline``."""
    base = statistics.median(times[baseline])
    out = {}
    for name, ts in times.items():
        paired = paired_ratio(ts, times[baseline])
        out[name] = {
            "ms_per_step": round(1000 * statistics.median(ts) / per, 4),
            "ms_per_step_min": round(1000 * min(ts) / per, 4),
            "ratio": round(statistics.median(ts) / base, 4),
            "ratio_paired": paired["median"],
            "ratio_paired_ci90": paired["ci90"],
            "runs": len(ts),
        }
    return out


def _agree(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.cpu(), b.cpu()
    return {"equal": bool(torch.equal(a, b)), "agree": round(float((a == b).float().mean()), 4), "tokens": a.numel()}


def _keep_logits(model, sink: list[torch.Tensor]) -> contextlib.AbstractContextManager:
    """Append the last position's logits ``[B, V]`` of every forward to ``sink`` (a hook on lm_head)."""
    return installed([(model.lm_head, lambda mod, a, out: sink.append(out[:, -1].float().cpu()))])


def _generate_ref(model, inputs: dict, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF greedy generate (DynamicCache, its own masks): new tokens ``[B, n]`` and their logits ``[B, n, V]``."""
    out = model.generate(
        **inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
        output_logits=True, return_dict_in_generate=True,
    )
    prompt_len = inputs["input_ids"].shape[1]
    return out.sequences[:, prompt_len:], torch.stack([x.float().cpu() for x in out.logits], dim=1)


def bench_batch(args, model, target, layout, mask, batch: int, cuda: bool) -> dict:
    acts = [target.module(hp) for hp in layout.hook_points]
    inputs = random_prompts(model, batch, args.prompt_len, seed=batch)
    dec = Decoder(model, batch, args.prompt_len, args.steps)
    counts = [torch.zeros(batch, a.width, dtype=torch.int32, device=dec.ids.device) for a in layout.hook_points]

    def count_hook(h: int):
        def hook(module, inp, g):  # g: [batch, pos, d_mlp]
            counts[h].add_((g > 0).sum(dim=1, dtype=torch.int32))

        return hook

    contexts: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
        "plain": contextlib.nullcontext,
        "noop": lambda: installed((m, lambda mod, a, g: None) for m in acts),
        "steer": lambda: steer(target, mask, "steer", 1.0),
    }
    skipped = {}
    if batch > 1:
        row_masks = [random_mask(layout, args.rate, seed=1 + b) for b in range(batch)]
        rows = [Condition(m, "steer", 0.5 + 0.1 * b) for b, m in enumerate(row_masks)]
        mixed = [Condition(m, *STEER_METHODS[b % len(STEER_METHODS)]) for b, m in enumerate(row_masks)]
        contexts["rows"] = lambda: steer_rows(target, rows)
        contexts["rows_mixed"] = lambda: steer_rows(target, mixed)
    else:
        skipped = {"rows": "batch 1", "rows_mixed": "batch 1"}
    contexts["folded"] = lambda: folded(target, mask, "steer", 1.0)
    contexts["count"] = lambda: installed((m, count_hook(h)) for h, m in enumerate(acts))
    # GateRecorder's default ("chunk") costs one copy per hook point and decode step into a chunk buffer,
    # plus one reduction per full chunk (timed separately below: a flush runs outside any step).
    chunk = GateRecorder(target)._chunk_len(layout.n_neurons, batch)
    dtype = next(model.parameters()).dtype
    bufs = [torch.randn(chunk, batch, 1, a.width, dtype=dtype, device=dec.ids.device) for a in layout.hook_points]

    def chunk_hook(h: int):
        slot = bufs[h][0]

        def hook(module, inp, g):  # g: [batch, pos, d_mlp]; decode steps only (the prefill is reduced at once)
            if g.shape[1] == 1:
                slot.copy_(g)

        return hook

    contexts["chunk_copy"] = lambda: installed((m, chunk_hook(h)) for h, m in enumerate(acts))

    n_check = min(args.check_steps, args.steps)
    firsts: dict[str, torch.Tensor] = {}
    graphs: dict[str, tuple[torch.cuda.CUDAGraph, list]] = {}
    errors: dict[str, str] = {}
    tokens: dict[str, dict] = {}
    step_ops: dict[str, dict] = {}
    eager_ok: list[str] = []  # variants whose eager static-cache steps ran (timed even if capture fails)
    for name, make in contexts.items():
        _log(f"batch {batch}: setting up {name}")
        try:
            with make():
                logits: list[torch.Tensor] = []  # [B, V] per forward: prefill, then each eager step
                with _keep_logits(model, logits):
                    first = firsts[name] = dec.prefill(inputs["input_ids"])
                dec.reset(first)
                with StepSpy(cuda) as spy:
                    dec.step()
                step_ops[name] = {"ops_per_step": sum(spy.ops.values()), "capture_suspects": dict(spy.suspects)}
                dec.reset(first)
                with _keep_logits(model, logits):
                    eager = dec.run(n_check, collect=True)
                want = args.prompt_len + n_check  # every layer's write counter after n_check steps
                check: dict = {"cache_counters_ok": dec.counters() == [want] * len(dec.cache.layers)}
                tokens[name] = check
                eager_ok.append(name)
                if name in ("plain", "steer") or not cuda:
                    # the same steps through HF generate (DynamicCache, its own masks), same context
                    ref, ref_logits = _generate_ref(model, inputs, n_check + 1)
                    check["static_vs_generate"] = _agree(torch.cat([first, eager], dim=1), ref)
                    diff = (torch.stack(logits, dim=1) - ref_logits).abs().max()
                    check["static_vs_generate"]["max_logit_diff"] = float(diff)
                if cuda:
                    graph = capture(dec, first)
                    dec.reset(first)
                    replayed = dec.run(n_check, replay=graph.replay, collect=True)
                    check["graph_vs_eager"] = _agree(replayed, eager)
                    check["cache_counters_ok"] &= dec.counters() == [want] * len(dec.cache.layers)
                    graphs[name] = (graph, _hook_refs(model))
        except Exception as e:  # one failing variant must not lose the GPU session
            errors[name] = f"{type(e).__name__}: {e}"
            _log(f"batch {batch}: {name} failed: {errors[name]}")
            with contextlib.suppress(Exception):
                torch.cuda.synchronize() if cuda else None

    if not cuda:  # the static-cache path must equal HF generate exactly in float32
        for name in ("plain", "steer"):
            got = tokens.get(name, {})
            assert got.get("static_vs_generate", {}).get("equal"), f"{name}: static-cache != generate: {got}"
            # tokens alone miss small errors (a position off by one moves these logits by ~1e-3)
            assert got["static_vs_generate"]["max_logit_diff"] < 1e-4, f"{name}: logits differ: {got}"
            assert got["cache_counters_ok"], f"{name}: StaticCache write counters out of step: {dec.counters()}"

    timed = _timer(cuda)
    steps = args.steps

    def graph_run(name: str) -> Callable[[], float]:
        graph = graphs[name][0]

        def run() -> float:
            dec.reset(firsts[name])
            return timed(lambda: dec.run(steps, replay=graph.replay))

        return run

    def eager_run(name: str) -> Callable[[], float]:
        def run() -> float:
            with contexts[name]():  # entered outside the timed span
                dec.reset(firsts[name])
                return timed(lambda: dec.run(steps))

        return run

    if cuda:
        main = {n: graph_run(n) for n in graphs}
    else:
        main = {n: eager_run(n) for n in eager_ok}
    extra = {f"{n}@eager": eager_run(n) for n in ("plain", "steer") if n in eager_ok}
    extra["generate"] = lambda: timed(lambda: greedy(model, inputs, steps))
    result: dict = {
        "mode": "cuda_graph" if cuda else f"eager ({NO_GRAPH})",
        "skipped": skipped,
        "errors": errors,
        "tokens": tokens,
        "step_ops": step_ops,
    }
    if "plain" not in main:  # nothing to compare with
        return result

    everything = main | extra
    for fn in main.values():  # warm-up (the first replay uploads the graph); eager/generate ran in setup
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {n: [] for n in everything}
    for r in range(args.repeats):
        names = list(main) + (list(extra) if r < args.eager_repeats else [])
        names = names[r % len(names) :] + names[: r % len(names)]  # rotate: no fixed neighbour
        _log(f"batch {batch}: round {r + 1}/{args.repeats}")
        for n in names:
            times[n].append(everything[n]())
    result["steps"] = _stats({n: times[n] for n in main}, "plain", steps)
    eager_times = {n: times[n] for n in extra if times[n]}
    if "plain@eager" in eager_times:
        result["eager"] = _stats(eager_times, "plain@eager", steps)
        gen = result["eager"].pop("generate", None)
        if gen is not None:
            result["generate_ms_per_token"] = gen["ms_per_step"]
            result["generate_over_plain_step"] = round(gen["ms_per_step"] / result["steps"]["plain"]["ms_per_step"], 3)
        result["graph_speedup"] = cuda and {
            n: round(result["eager"][f"{n}@eager"]["ms_per_step"] / result["steps"][n]["ms_per_step"], 3)
            for n in ("plain", "steer")
            if f"{n}@eager" in result["eager"] and n in result["steps"]
        }
    result["tokens_per_s_plain"] = round(1000 * batch / result["steps"]["plain"]["ms_per_step"], 1)
    if "chunk_copy" in result["steps"]:
        result["recorder_chunk"] = _chunk_model(bufs, chunk, batch, timed, result["steps"])
    return result


def _chunk_model(bufs: list[torch.Tensor], chunk: int, batch: int, timed, steps: dict) -> dict:
    """GateRecorder ``chunk`` per decode step: the replayed copy plus 1/chunk of a full-chunk flush.

    The flush is the recorder's own reduction (``_Point._reduce_dense``: counts, float64 sums and sums of
    squares, validity mask) over every hook point's ``[chunk, B, D]`` buffer, timed with CUDA events.
    """
    from types import SimpleNamespace

    device = bufs[0].device
    valid = torch.ones(chunk, batch, dtype=torch.bool, device=device)
    points = [
        SimpleNamespace(
            moments=True,
            counts=torch.zeros(batch, b.shape[-1], dtype=torch.int32, device=device),
            sums=torch.zeros(batch, b.shape[-1], dtype=torch.float64, device=device),
            sumsq=torch.zeros(batch, b.shape[-1], dtype=torch.float64, device=device),
        )
        for b in bufs
    ]

    def flush_all():
        for p, b in zip(points, bufs, strict=True):
            _Point._reduce_dense(p, b[:, :, 0], valid, dim=0)

    flush_all()  # warm-up
    flush_ms = 1000 * statistics.median(timed(flush_all) for _ in range(5))
    plain, copy = steps["plain"]["ms_per_step"], steps["chunk_copy"]["ms_per_step"]
    return {
        "chunk_steps": chunk,
        "flush_ms_per_chunk": round(flush_ms, 3),
        "flush_ms_per_step": round(flush_ms / chunk, 4),
        "modeled_ratio": round((copy + flush_ms / chunk) / plain, 4),
    }


def _table(summary: dict) -> str:
    """The tail of the output: one block per batch size."""
    lines = []
    for batch, res in summary["batches"].items():
        lines.append(f"batch {batch}: {res['mode']}, ms/step = median over runs of {summary['steps']} steps")
        lines.append(f"  {'variant':<12} {'ms/step':>9} {'ratio':>7}  paired [90% CI]")
        for section, base in (("steps", "plain"), ("eager", "plain@eager")):
            for name, s in res.get(section, {}).items():
                ci = s["ratio_paired_ci90"]
                lines.append(
                    f"  {name:<12} {s['ms_per_step']:>9.3f} {s['ratio']:>7.4f}  "
                    f"{s['ratio_paired']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]" + ("" if name != base else "  <- baseline")
                )
        if "generate_ms_per_token" in res:
            lines.append(f"  {'generate':<12} {res['generate_ms_per_token']:>9.3f}  (HF generate, ms/token)")
        if res.get("recorder_chunk"):
            rc = res["recorder_chunk"]
            lines.append(
                f"  GateRecorder chunk: copy/step + flush/{rc['chunk_steps']} steps ({rc['flush_ms_per_chunk']:.3f} ms)"
                f" -> ratio {rc['modeled_ratio']:.4f}"
            )
        if res.get("graph_speedup"):
            lines.append(f"  graph speed-up per step (eager ms / graph ms): {res['graph_speedup']}")
        agree = {n: c["graph_vs_eager"]["agree"] for n, c in res["tokens"].items() if "graph_vs_eager" in c}
        if agree:
            lines.append(f"  graph vs eager token agreement: {agree}")
        for name, err in res["errors"].items():
            lines.append(f"  {name}: FAILED {err[:300]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--steps", type=int, default=128, help="decode steps per timed run")
    ap.add_argument("--repeats", type=int, default=15, help="rounds of graph runs")
    ap.add_argument("--eager-repeats", type=int, default=3, help="first rounds that also time eager + generate")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each variant before the rounds")
    ap.add_argument("--check-steps", type=int, default=16, help="steps compared token by token")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--rate", type=float, default=0.005, help="fraction of all gate neurons in each mask")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")

    model = build_qwen2(args.size, device=args.device)
    points = gate_hook_points(model, "model.layers", "lm")
    target = ModelTarget(model, points, {"lm": StreamSpec("model")})
    layout = target.layout()
    mask = random_mask(layout, args.rate, seed=0)
    summary: dict = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "size": args.size,
        "sizes": SIZES[args.size],
        "dtype": str(next(model.parameters()).dtype),
        "steps": args.steps,
        "repeats": args.repeats,
        "eager_repeats": args.eager_repeats,
        "prompt_len": args.prompt_len,
        "mask_neurons": len(mask),
        "n_neurons": layout.n_neurons,
        "graphs": cuda or NO_GRAPH,
        "batches": {},
    }
    t0 = time.perf_counter()
    with torch.inference_mode():
        for batch in [int(b) for b in args.batches.split(",") if b]:
            summary["batches"][str(batch)] = bench_batch(args, model, target, layout, mask, batch, cuda)
            if cuda:
                torch.cuda.empty_cache()
            # each batch's results leave the process at once: a run cut off later keeps them
            _log(_table({**summary, "batches": {str(batch): summary["batches"][str(batch)]}}))
            if args.out:
                args.out.write_text(json.dumps(summary, indent=2) + "\n")
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    print(_table(summary))
    return summary


if __name__ == "__main__":
    main()
