"""Qwen3-Omni EVC generation with routed recording and steering, side by side with plain generation.

The model is the real ``Qwen3OmniMoeForConditionalGeneration`` at the released Qwen3-Omni-30B-A3B-Instruct
sizes (``config_30b``: thinker 48 MoE layers x 128 experts x 768 units, top 8; talker 20 MoE layers x 128
x 384, top 6, shared expert 768; code predictor 5 x 3072; code2wav; audio and vision towers) with random
weights, built directly on the device in bf16 (about 70 GB on an H200; nothing is read from disk). Token
ids come from the adapter's tiny byte tokenizer (the prompt is longer in tokens than with Qwen's BPE).
Generation runs through ``Qwen3OmniAdapter.generate``, the product's own path; text and codec lengths are
forced (``*_min_new_tokens``) so every variant does the same work.

Variants, interleaved per repeat (plain, record, steer, ...): ``plain``; ``record`` (``GateRecorder`` on
``lm`` and ``synth``: routed, shared-expert and code-predictor hook points, moments on); ``steer`` (one
random mask of rate r over both streams, steer alpha 1); ``steer_generated`` (the same with
``positions="generated"``: the prefills left alone, so its difference to ``steer`` is what steering the
prompt costs); ``steer_rows`` (batch > 1: a different mask and
method per row); ``steer_rows_same`` (batch > 1: a different mask per row, every row ``steer`` alpha 1,
so its difference to ``steer_rows`` is what mixing methods costs: scale, shift and floor tensors instead
of scale alone). Each repeat runs every variant once, in an order rotated by one per repeat. Reported as
paired ratios to ``plain`` of the same repeat (median, bootstrap 95% interval over repeats, min, max):
wall time (CUDA synchronised; the recorder's statistics brought to the host included), the median
decode-step time of the thinker and of the talker (host timestamps of their forwards, see ``StepClock``),
and peak allocated memory (with ``--decode graph`` a decode step is a CUDA-graph replay that runs no
forward, so only the prefills are stamped: read the wall time). ``--experts`` picks the experts
implementation timed, ``--decode``/``--decode-experts`` the adapter's decode options. Before timing, ``check`` verifies on the device that the rows ``act_fn``
sees map to the (token, expert) esn computes: each row equals that expert's gate computed by hand.

    python benchmarks/bench_qwen3_omni.py --size tiny --device cpu               # smoke run
    python benchmarks/bench_qwen3_omni.py --size 30b --device cuda --out r.json  # H200, decode="graph"
    python benchmarks/bench_qwen3_omni.py --size 30b --device cuda --decode generate  # transformers' generate
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import STEER_METHODS, random_mask  # noqa: E402


def config_30b():
    """Qwen3-Omni-30B-A3B-Instruct sizes (its public config.json, transformers 5 names); token ids of the
    tiny byte tokenizer so that the adapter's own prompt builder can be used."""
    from esn_qwen3_omni import tiny
    from transformers import Qwen3OmniMoeConfig

    ids = {t: tiny._id(t) for t in tiny.SPECIALS}
    mrope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [24, 20, 20], "interleaved": True}
    media = {"audio_token_id": ids["<|audio_pad|>"], "image_token_id": ids["<|image_pad|>"],
             "video_token_id": ids["<|video_pad|>"], "vision_start_token_id": ids["<|vision_start|>"],
             "audio_start_token_id": ids["<|audio_start|>"]}
    thinker = {
        "text_config": {
            "vocab_size": 152064, "hidden_size": 2048, "intermediate_size": 768, "num_hidden_layers": 48,
            "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "moe_intermediate_size": 768,
            "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "max_position_embeddings": 65536, "rms_norm_eps": 1e-6,
            "rope_parameters": {**mrope, "mrope_interleaved": True},
            "pad_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        },
        "audio_config": {
            "d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
            "output_dim": 2048, "downsample_hidden_size": 480, "n_window": 50, "n_window_infer": 800,
            "conv_chunksize": 500, "num_mel_bins": 128, "max_source_positions": 1500,
        },
        "vision_config": {
            "depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "out_hidden_size": 2048,
            "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "deepstack_visual_indexes": [8, 16, 24], "num_position_embeddings": 2304,
        },
        "user_token_id": tiny.role_id("user"), "position_id_per_seconds": 13, **media,
    }
    talker = {
        "text_config": {
            "vocab_size": 3072, "hidden_size": 1024, "intermediate_size": 2048, "num_hidden_layers": 20,
            "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 128, "moe_intermediate_size": 384,
            "shared_expert_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 6,
            "norm_topk_prob": True, "max_position_embeddings": 65536, "rope_parameters": mrope,
        },
        "code_predictor_config": {
            "vocab_size": 2048, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 5,
            "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "num_code_groups": 16,
            "max_position_embeddings": 32768, "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
        },
        "num_code_groups": 16, "thinker_hidden_size": 2048, "accept_hidden_layer": 24,
        "codec_pad_id": 2148, "codec_bos_id": 2149, "codec_eos_token_id": 2150, "codec_nothink_id": 2155,
        "codec_think_bos_id": 2156, "codec_think_eos_id": 2157,
        "speaker_id": {"chelsie": 2301, "ethan": 2302, "aiden": 2303},
        "position_id_per_seconds": 13, "spatial_merge_size": 2, **media,
    }
    code2wav = {
        "codebook_size": 2048, "hidden_size": 1024, "max_position_embeddings": 8000, "num_attention_heads": 16,
        "num_key_value_heads": 16, "sliding_window": 72, "intermediate_size": 3072, "num_hidden_layers": 8,
        "num_quantizers": 16, "upsample_rates": [8, 5, 4, 3], "upsampling_ratios": [2, 2], "decoder_dim": 1536,
    }
    config = Qwen3OmniMoeConfig(
        thinker_config=thinker, talker_config=talker, code2wav_config=code2wav, enable_audio_output=True,
        im_start_token_id=ids["<|im_start|>"], im_end_token_id=ids["<|im_end|>"],
        tts_pad_token_id=ids["<tts_pad>"], tts_bos_token_id=ids["<tts_text_bos>"],
        tts_eos_token_id=ids["<tts_text_eod>"], system_token_id=tiny.role_id("system"),
        user_token_id=tiny.role_id("user"), assistant_token_id=tiny.role_id("assistant"),
    )
    config.architectures = ["Qwen3OmniMoeForConditionalGeneration"]
    return config


def build(size: str, device: str, seed: int = 0):
    """The adapter around a random-weight model built on ``device`` (bf16 on CUDA, float32 on CPU)."""
    from esn_qwen3_omni import Qwen3OmniAdapter, tiny
    from esn_qwen3_omni.checks import check_finite
    from transformers import Qwen3OmniMoeForConditionalGeneration, WhisperFeatureExtractor
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = config_30b() if size == "30b" else tiny.tiny_config()
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    before = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3OmniMoeForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(before)
    tiny.initialise_talker_experts(model, seed=seed + 1)  # transformers leaves them unset
    tiny.audible_code2wav(model, seed=seed + 2)
    check_finite(model, f"random {size}")
    features = WhisperFeatureExtractor(feature_size=128, sampling_rate=16_000)
    return Qwen3OmniAdapter(model, f"random-{size}", tiny.tiny_tokenizer(), features)


def check_rows(adapter, requests, gen) -> dict:
    """On the device: every row act_fn returns equals the by-hand gate of the (token, expert) that
    ``esn.routing.row_order`` assigns to it, for the first routed layer of each stream (prefill + decode)."""
    from esn.hooks import installed
    from esn.routing import implementation, row_order

    points = [next(h for h in adapter.layout() if h.routed and h.stream == s) for s in ("lm", "synth")]
    # per forward: (hidden, top_k_index, implementation, [gates]); the implementation is read in the forward:
    # transformers' generate switches grouped_mm layers to batched_mm for its decode loop, and back after
    seen: dict[str, list] = {hp.name: [] for hp in points}
    pre, fwd = [], []
    for hp in points:
        def on_experts(m, a, k, box=seen[hp.name], hp=hp):
            box.append((a[0].detach(), a[1].detach(), implementation(m, hp), []))

        def on_gate(m, a, g, box=seen[hp.name]):  # eager: one call per routed-to expert
            box[-1][3].append(g.detach())

        pre.append((adapter.model.get_submodule(hp.router), on_experts))
        fwd.append((adapter.model.get_submodule(hp.module), on_gate))
    with installed(pre, kind="pre", with_kwargs=True), installed(fwd):
        adapter.generate(requests, gen)
    out = {}
    for hp in points:
        experts = adapter.model.get_submodule(hp.router)
        d = hp.unit_width
        rows_total, wrong, permuted, per_forward, impls = 0, 0, 0, [], []
        for hidden, index, impl, gates in seen[hp.name]:
            impls.append(impl)
            expert, entry = row_order(index, impl)
            g = torch.cat(gates).float()
            x = hidden[entry // hp.top_k].float()  # [rows, h]
            bad = 0
            for e in torch.unique(expert).tolist():  # each expert's MLP by hand on the rows esn gives it
                rows = expert == e
                ref = torch.nn.functional.silu(x[rows] @ experts.gate_up_proj[e, :d].float().T)
                cos = torch.nn.functional.cosine_similarity(g[rows][:, None], ref[None], dim=-1)  # [r, r]
                match = cos.diagonal() > 0.99
                bad += int((~match).sum())
                permuted += int(((~match) & (cos.max(1).values > 0.99)).sum())  # another row's token
            rows_total += expert.numel()
            wrong += bad
            per_forward.append([int(index.shape[0]), bad, impl])
        out[hp.name] = {"rows": rows_total, "mismatched_rows": wrong, "of_them_another_rows_token": permuted,
                        "forwards_tokens_mismatched_implementation": per_forward,
                        "implementations": {i: impls.count(i) for i in sorted(set(impls))}}
    return out


class StepClock:
    """Host timestamps of every forward of the stream roots (``thinker``, ``talker``), installed in every
    variant alike (plain too). Generation is host-bound at batch 1 (the device waits on Python), so the
    interval between two root forwards is that decode step's cost; its median over dozens of steps is far
    steadier than a whole generate call, whose prefill, audio encoder and code2wav dilute the hooks' share."""

    def __init__(self, model, roots=("thinker", "talker")):
        self.model = model
        self.roots = roots
        self.stamps: dict[str, list[float]] = {r: [] for r in roots}

    def __enter__(self):
        from esn.hooks import installed

        self._cm = installed([(self.model.get_submodule(r), lambda m, a, box=self.stamps[r]: box.append(
            time.perf_counter())) for r in self.roots], kind="pre")
        self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)

    def decode_steps(self) -> dict[str, list[float]]:
        """Per root, the intervals between consecutive forwards after the prefill (one per decode step;
        the talker's include its code predictor)."""
        return {r: [b - a for a, b in itertools.pairwise(t[1:])] for r, t in self.stamps.items()}


def timed(fn, device, model, clock: bool = True) -> tuple[float, int, dict[str, float]]:
    """Wall time (device synchronised), peak allocated bytes, and the median decode-step time per root.

    ``clock=False`` under graph decode: a replayed step runs no hook, so there is nothing to stamp, and the
    clock's hooks (new ones per call, inside the decoded modules) would give every call a new hook
    fingerprint, i.e. a fresh capture per call instead of a replay of the captured graph."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with StepClock(model) if clock else contextlib.nullcontext() as stamps:
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    steps = {r: statistics.median(v) for r, v in stamps.decode_steps().items() if v} if clock else {}
    return wall, (torch.cuda.max_memory_allocated() if cuda else 0), steps


def _equal_fraction(a, b) -> float | None:
    """Share of equal entries of two code arrays (up to the shorter length), None if either is missing."""
    if a is None or b is None:
        return None
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    n = min(a.shape[-1], b.shape[-1])
    if n == 0 or a.shape[:-1] != b.shape[:-1]:
        return None
    return float((a[..., :n] == b[..., :n]).float().mean())


def profiled(fn, device, top: int = 30) -> dict:
    """One call of ``fn`` under cProfile (device synchronised at the end): its costliest functions by own
    time, as pstats lines, and every function with at least 0.1 ms of own time as
    ``{"file:line(name)": [calls, own seconds, cumulative seconds]}`` (where the host spends a call, and
    what one variant adds to another)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    functions = {f"{file}:{line}({name})": [calls, round(own, 6), round(cum, 6)]
                 for (file, line, name), (_, calls, own, cum, _) in stats.stats.items() if own >= 1e-4}
    return {"top": [line for line in text.getvalue().splitlines() if line.strip()], "functions": functions}


def device_time(fn) -> dict:
    """One call of ``fn`` under torch.profiler (CUDA activity only): the summed device time of its kernels
    and memory copies, captured-graph replays included, and the 12 costliest kernels (what a variant adds
    on the device, apart from the host)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    except Exception as exc:  # a profiler that cannot trace here must not lose the timings
        return {"error": f"{type(exc).__name__}: {exc}"}
    events.sort(key=lambda e: -e.self_device_time_total)
    return {"device_seconds": sum(e.self_device_time_total for e in events) / 1e6,
            "launches": sum(e.count for e in events),
            "top": [[e.key[:120], e.count, e.self_device_time_total / 1e6] for e in events[:12]]}


def ratio_summary(values: list[float], base: list[float], seed: int = 0) -> dict:
    """Paired ratios ``values[i] / base[i]`` (one per repeat): median, min, max and a bootstrap 95%
    interval of the median (resampling repeats)."""
    import random

    ratios = [a / b for a, b in zip(values, base, strict=True)]
    rng = random.Random(seed)
    boots = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    return {"median": statistics.median(ratios), "ci95": [boots[49], boots[1949]], "min": min(ratios),
            "max": max(ratios), "n": len(ratios)}


def main() -> None:
    from esn.adapters import GenerationConfig
    from esn.recording import GateRecorder
    from esn.steering import Condition, steer, steer_rows
    from esn.testing import tiny_requests

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("tiny", "30b"), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--text-tokens", type=int, default=24)
    ap.add_argument("--audio-tokens", type=int, default=48)
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each source utterance")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rate", type=float, default=0.005, help="steering mask rate r")
    ap.add_argument("--experts", choices=("grouped_mm", "batched_mm", "eager"), default=None,
                    help="experts implementation to time (default: the model's, grouped_mm)")
    ap.add_argument("--decode", choices=("graph", "generate"), default=None,
                    help="adapter option decode (default: the adapter's: graph on CUDA unless the experts are eager)")
    ap.add_argument("--decode-experts", choices=("grouped_mm", "batched_mm"), default=None,
                    help="adapter option decode_experts: experts implementation of graph decode steps")
    ap.add_argument("--variants", nargs="+",
                    choices=("record", "steer", "steer_generated", "steer_rows", "steer_rows_same", "eager"),
                    default=["record", "steer", "steer_rows"], help="timed beside plain (steer_rows*: batch > 1)")
    ap.add_argument("--budget", type=float, default=1e9, help="stop starting new repeats after this many seconds")
    ap.add_argument("--check", nargs="*", default=["grouped_mm", "eager"], help="experts implementations whose "
                    "row mapping is checked against each expert's MLP by hand before timing")
    ap.add_argument("--profile", action="store_true", help="after timing, run each variant once more under "
                    "cProfile (device synchronised) and keep its 30 costliest functions (host time) in the JSON")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    t_start = time.perf_counter()
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(1)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    result: dict = {"benchmark": "bench_qwen3_omni", "size": args.size, "device": args.device,
                    "torch": torch.__version__, "python": platform.python_version(), "args": vars(args) | {"out": str(args.out)},
                    "batches": {}}
    if torch.cuda.is_available() and torch.device(args.device).type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except ImportError:
        pass

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(result, indent=1, default=str))

    adapter = build(args.size, args.device)
    layout = adapter.layout()
    result["model"] = {
        "parameters": sum(p.numel() for p in adapter.model.parameters()),
        "experts_implementation": adapter.model.get_experts_implementation(),
        "hook_points": len(layout), "neurons": layout.n_neurons, "position_groups": layout.n_groups,
        "routed": sum(hp.routed for hp in layout),
    }
    if torch.device(args.device).type == "cuda":
        result["model"]["weights_gib"] = torch.cuda.memory_allocated() / 2**30
    log(f"built {args.size}: {result['model']}")
    decoding = {k: v for k, v in (("decode", args.decode), ("decode_experts", args.decode_experts)) if v}
    gen = GenerationConfig(max_new_tokens=args.text_tokens, max_audio_tokens=args.audio_tokens, seed=0,
                           options={"thinker_min_new_tokens": args.text_tokens,
                                    "talker_min_new_tokens": args.audio_tokens, **decoding})
    # the row check keeps plain Python hooks on act_fn: transformers' generate runs them every step
    short = gen.model_copy(update={"max_new_tokens": 4, "max_audio_tokens": 4,
                                   "options": {"thinker_min_new_tokens": 4, "talker_min_new_tokens": 4,
                                               "decode": "generate"}})
    result["check"] = {}
    for impl in args.check:  # the row mapping, per experts implementation, on this device
        before = adapter.model.get_experts_implementation()
        adapter.model.set_experts_implementation(impl)
        try:
            result["check"][impl] = check_rows(adapter, tiny_requests(2, seconds=args.seconds), short)
        finally:
            adapter.model.set_experts_implementation(before)
        log(f"row mapping check {impl}: {result['check'][impl]}")
        save()
    if args.experts:
        adapter.model.set_experts_implementation(args.experts)
    result["timed_experts_implementation"] = adapter.model.get_experts_implementation()
    save()
    mask = random_mask(layout, args.rate, seed=1)
    for batch in args.batches:
        reqs = tiny_requests(batch, seconds=args.seconds)
        conds = [Condition(random_mask(layout, args.rate, seed=10 + b), *STEER_METHODS[b % len(STEER_METHODS)])
                 for b in range(batch)]
        same = [Condition(c.mask, "steer", 1.0) for c in conds]  # per-row masks, one method
        stats_box: dict = {}

        def plain(reqs=reqs):
            result["decode"] = adapter.generate(reqs, gen)[0].info["decode"]

        def record(reqs=reqs, box=stats_box):
            with GateRecorder(adapter, streams=["lm", "synth"]) as rec:
                adapter.generate(reqs, gen)
            box["stats"] = rec.stats()  # counted: the statistics reach the host

        def steered(reqs=reqs):
            with steer(adapter, mask, "steer", 1.0):
                adapter.generate(reqs, gen)

        def steered_generated(reqs=reqs):  # the prompt (prefill) left alone: what steering the prefill costs
            with steer(adapter, mask, "steer", 1.0, positions="generated"):
                adapter.generate(reqs, gen)

        def rows(reqs=reqs, conds=conds):
            with steer_rows(adapter, conds):
                adapter.generate(reqs, gen)

        def rows_same(reqs=reqs, same=same):
            with steer_rows(adapter, same):
                adapter.generate(reqs, gen)

        eager_gen = gen.model_copy(update={"options": {**gen.options, "decode": "generate"}})

        def eager(reqs=reqs, eager_gen=eager_gen):  # transformers' generate, beside the graph path (decode="graph" runs)
            adapter.generate(reqs, eager_gen)

        if "eager" in args.variants and result.get("decode") != "generate":  # same tokens and codes both ways?
            graph_out, eager_out = adapter.generate(reqs, gen), adapter.generate(reqs, eager_gen)
            result.setdefault("graph_vs_eager", {})[str(batch)] = [
                {"text_equal": a.text == b.text, "codes": [list(torch.as_tensor(r.info["audio_codes"]).shape)
                                                            for r in (a, b)],
                 "codes_equal_fraction": _equal_fraction(a.info.get("audio_codes"), b.info.get("audio_codes"))}
                for a, b in zip(graph_out, eager_out, strict=True)]
            log(f"batch {batch}: graph vs eager {result['graph_vs_eager'][str(batch)]}")
        variants = {"plain": plain} | {name: fn for name, fn in (("record", record), ("steer", steered),
                                                                    ("steer_generated", steered_generated),
                                                                    ("steer_rows", rows),
                                                                    ("steer_rows_same", rows_same), ("eager", eager))
                                       if name in args.variants and (not name.startswith("steer_rows") or batch > 1)}
        names = list(variants)
        for fn in variants.values():  # warm-up: kernels, allocator, lazy imports
            fn()
        log(f"batch {batch}: warmed up")
        times: dict[str, list[float]] = {k: [] for k in variants}
        peaks: dict[str, list[int]] = {k: [] for k in variants}
        steps: dict[str, dict[str, list[float]]] = {k: {} for k in variants}
        captures = dict.fromkeys(variants, 0)  # graph captures during the timed calls (0: every call replayed)
        entry = result["batches"][str(batch)] = {}
        for rep in range(args.repeats):
            if rep and time.perf_counter() - t_start > args.budget:
                log(f"batch {batch}: budget reached after {rep} repeats")
                break
            order = names[rep % len(names):] + names[:rep % len(names)]  # rotated: no variant always first
            for name in order:
                t, peak, med = timed(variants[name], args.device, adapter.model, clock=result.get("decode") != "graph")
                info = getattr(adapter, "last_decode_info", None) or {}
                captures[name] += sum(bool(v.get("captured")) for v in info.values() if isinstance(v, dict))
                times[name].append(t)
                peaks[name].append(peak)
                for root, v in med.items():
                    steps[name].setdefault(root, []).append(v)
            log(f"batch {batch} repeat {rep} ({', '.join(order)}): " + ", ".join(
                f"{k} {times[k][-1]:.2f}s ({times[k][-1] / times['plain'][-1]:.3f}x; step "
                + ", ".join(f"{r} {steps[k][r][-1] * 1e3:.1f}" for r in steps[k]) + " ms)" for k in names))
            entry.update({
                "repeats": rep + 1, "orders_rotated": True,
                "seconds": times, "peak_bytes": peaks, "decode_step_median_seconds": steps,
                "captures_during_repeats": captures,
                "time_ratio": {k: ratio_summary(v, times["plain"]) for k, v in times.items() if rep},
                "step_ratio": {k: {r: ratio_summary(v, steps["plain"][r]) for r, v in per.items()}
                               for k, per in steps.items() if rep},
                "time_ratio_median": {k: statistics.median(a / b for a, b in zip(v, times["plain"], strict=True))
                                      for k, v in times.items()},
                "peak_ratio": {k: (max(v) / max(peaks["plain"]) if max(peaks["plain"]) else None)
                               for k, v in peaks.items()},
            })
            save()
        entry["decode_info"] = getattr(adapter, "last_decode_info", None)  # captured / reused, last call
        if args.profile:
            entry["profile"] = {name: profiled(variants[name], args.device) for name in names}
            save()
            if torch.device(args.device).type == "cuda":
                entry["device_time"] = {name: device_time(variants[name]) for name in names}
                save()
        if "stats" not in stats_box:
            continue
        st = stats_box["stats"]
        entry["recorded"] = {"counts_shape": list(st.counts.shape), "tokens_shape": list(st.tokens.shape),
                             "positions_lm0": st.tokens[:, layout.group_slice(layout.names[0])].sum(1).tolist()}
        save()
    log("done")
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
