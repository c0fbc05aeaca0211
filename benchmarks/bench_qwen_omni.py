"""EVC generation through QwenOmniAdapter: eager and graph decoding, plain, recording and steering, side by side.

    python benchmarks/bench_qwen_omni.py --device cpu --size tiny                      # anywhere, tiny model
    python benchmarks/bench_qwen_omni.py --device cuda --size 7b --check-tiny \
        --plan "16:eager/plain,graph/plain,graph/record,graph/steer,graph/rows,graph/rows+record;1:graph/plain,graph/steer" \
        --breakdown 16 --dit-check 8 --out result.json

The 7b model has random weights with the released Qwen2.5-Omni-7B sizes (thinker: 28 x 3584/18944,
vocab 152064, audio encoder 32 x 1280, vision 32 x 1280; talker: 24 x 896/18944, codec vocab 8448;
token2wav DiT 22 x 1024 + BigVGAN), built directly on the device in bf16 (token2wav fp32, as the model
does), no CPU init, no download. The tokenizer is esn's tiny byte-level one (ids don't matter with
random weights).

Fixed work per conversion: a 3 s input, exactly 48 text tokens and 256 codec tokens (min = max new
tokens), 10 token2wav ODE steps. A variant is ``DECODE/KIND[/bf16]``:

- ``DECODE``: ``eager`` (transformers' generate: adapter option ``decode="generate"``) or ``graph`` (esn.decode, one CUDA-graph replay a step);
- ``KIND``: ``plain``; ``record`` (GateRecorder, both streams; its reductions on a side stream, the
  default on CUDA); ``record_sync`` (the same with ``overlap=False``: reductions in order); ``record_torch``
  (reductions in torch ops instead of esn.gate_reduce's Triton kernel, on the side stream); ``steer`` (one mask, r = 0.5% of all gate
  neurons, alpha 1); ``rows`` (a different mask per row); ``rows_mixed`` (per-row masks, methods cycling
  steer/add/clamp/deactivate); ``rows+record`` (per-row masks and recording: the record stage of a
  steered grid);
- ``/bf16``: the DiT under bf16 autocast (adapter option ``token2wav_dit_dtype``).

``--plan`` lists the batch sizes and their variants. Per batch, each variant runs once untimed (its
first call: graph capture, reported separately as ``first_call_s`` and ``capture_s``), then
``--repeats`` interleaved rounds. Reported per variant: median seconds per generate, ratio to
``graph/plain`` (and the paired per-round ratio with a bootstrap interval), conversions/s, tokens/s,
peak device memory. Also: token agreement of graph and eager decoding (``agreement``), the graph replay
against the same steps run uncaptured (``capture_exact``), per-stage seconds (``--breakdown``), the bf16
DiT's deviation from float32 (``--dit-check``), and a tiny float32 model on the device decoded both ways
(``--check-tiny``: must agree exactly). ``--barrier DIR N`` makes N concurrent processes start their
timed rounds together (two processes on one GPU). The JSON is rewritten after every step (``--out``), so
a run cut off by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import STEER_METHODS, paired_ratio

TEXT_TOKENS, CODEC_TOKENS, T2W_STEPS, SECONDS = 48, 256, 10, 3.0


def config_7b():
    """Qwen2.5-Omni-7B sizes (config.json of Qwen/Qwen2.5-Omni-7B), with the tiny tokenizer's ids."""
    from esn_qwen_omni.tiny import token_ids
    from transformers import Qwen2_5OmniConfig

    ids, talker_ids = token_ids()
    talker_ids.update(
        tts_codec_pad_token_id=8292,
        tts_codec_start_token_id=8293,
        tts_codec_end_token_id=8294,
        tts_codec_mask_token_id=8296,
    )
    rope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]}  # head_dim 128
    thinker = {
        "audio_config": {
            "num_mel_bins": 128,
            "encoder_layers": 32,
            "encoder_attention_heads": 20,
            "encoder_ffn_dim": 5120,
            "d_model": 1280,
            "output_dim": 3584,
            "n_window": 100,
        },
        "vision_config": {
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
        "text_config": {
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "rope_parameters": rope,
            "max_position_embeddings": 32768,
        },
        **ids,
    }
    talker = {
        "vocab_size": 8448,
        "embedding_size": 3584,
        "hidden_size": 896,
        "intermediate_size": 18944,
        "num_hidden_layers": 24,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "rope_parameters": rope,
        "max_position_embeddings": 32768,
        **ids,
        **talker_ids,
    }
    # Random talker weights emit any of the 8448 codec ids; the released DiT embeds 8193 (the trained
    # talker never emits the others before eos). Widen the table so every random code is embeddable.
    token2wav = {"dit_config": {"num_embeds": talker["vocab_size"]}}
    return Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker, token2wav_config=token2wav)


def build(size: str, device: str, seed: int = 0, dtype: torch.dtype | None = None):
    from esn_qwen_omni import QwenOmniAdapter
    from esn_qwen_omni.tiny import speaker_bos, tiny_config, tiny_tokenizer
    from transformers import Qwen2_5OmniForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = tiny_config() if size == "tiny" else config_7b()
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5OmniForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.token2wav.float()
    model.eval()
    dit = config.token2wav_config.dit_config
    gen = torch.Generator().manual_seed(seed)
    speakers = {
        "Chelsie": {
            "bos_token": speaker_bos("Chelsie"),
            "cond": torch.randn(1, dit.enc_emb_dim, generator=gen),
            "ref_mel": torch.randn(1, 300, dit.mel_dim, generator=gen),
        }
    }
    return QwenOmniAdapter(model, f"random-{size}", tiny_tokenizer(), speakers)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def requests(batch: int, seconds: float = SECONDS):
    from esn.adapters import EVCRequest

    emotions = ("happy", "angry", "sad", "surprise")
    t = np.arange(int(seconds * 16_000)) / 16_000
    return [
        EVCRequest((0.3 * np.sin(2 * np.pi * (100 + 10 * i) * t)).astype(np.float32), emotions[i % 4], id=str(i))
        for i in range(batch)
    ]


def fixed_config(options: dict):
    from esn.adapters import GenerationConfig

    return GenerationConfig(
        max_new_tokens=TEXT_TOKENS,
        max_audio_tokens=CODEC_TOKENS,
        options={
            "thinker_min_new_tokens": TEXT_TOKENS,
            "talker_min_new_tokens": CODEC_TOKENS,
            "token2wav_num_steps": T2W_STEPS,
            **options,
        },
    )


class Variants:
    """``DECODE/KIND[/bf16]`` -> a function running one generate of that variant on a batch."""

    KINDS = ("plain", "record", "record_sync", "record_torch", "steer", "rows", "rows_mixed", "rows+record")

    def __init__(self, adapter, masks, base: dict):
        self.adapter, self.masks, self.base = adapter, masks, base

    def make(self, name: str, reqs):
        from esn.gate_reduce import torch_ops_only
        from esn.recording import GateRecorder
        from esn.steering import Condition, steer, steer_rows

        parts = name.split("/")
        if len(parts) not in (2, 3) or parts[0] not in ("eager", "graph") or parts[1] not in self.KINDS or (
            len(parts) == 3 and parts[2] != "bf16"
        ):
            raise SystemExit(f"unknown variant {name!r}: DECODE/KIND[/bf16], DECODE eager|graph, KIND {self.KINDS}")
        decode, kind = parts[:2]
        options = {**self.base, "decode": "generate" if decode == "eager" else decode, "token2wav_dit_dtype": "bfloat16" if len(parts) == 3 else "float32"}
        config = fixed_config(options)
        adapter, masks, batch = self.adapter, self.masks, len(reqs)
        rows = [Condition(masks[i], "steer", 1.0) for i in range(batch)]
        mixed = [Condition(masks[i], *STEER_METHODS[i % len(STEER_METHODS)]) for i in range(batch)]

        def run():
            with contextlib.ExitStack() as stack:
                rec = None
                if kind == "steer":
                    stack.enter_context(steer(adapter, masks[0], "steer", 1.0))
                elif kind in ("rows", "rows+record"):
                    stack.enter_context(steer_rows(adapter, rows))
                elif kind == "rows_mixed":
                    stack.enter_context(steer_rows(adapter, mixed))
                if kind in ("record", "rows+record"):
                    rec = stack.enter_context(GateRecorder(adapter))
                elif kind == "record_sync":
                    rec = stack.enter_context(GateRecorder(adapter, overlap=False))
                elif kind == "record_torch":
                    stack.enter_context(torch_ops_only())
                    rec = stack.enter_context(GateRecorder(adapter))
                out = adapter.generate(reqs, config)
            if rec is not None:  # (the recorder exits first, inside torch_ops_only)
                rec.stats()  # the statistics reach the host: part of the work
            return out

        return run


def agreement(a, b) -> dict:
    """How far two runs' tokens agree, per stream: equal rows, equal positions, first difference."""
    out = {}
    for key in ("text_ids", "audio_codes"):
        same_rows, equal, total, first = 0, 0, 0, []
        for x, y in zip(a, b, strict=True):
            u, v = x.info[key], y.info[key]
            n = min(len(u), len(v))
            diff = next((i for i in range(n) if u[i] != v[i]), n)  # n: equal as far as both go
            same_rows += u == v
            equal += sum(p == q for p, q in zip(u, v, strict=False))
            total += max(len(u), len(v))
            first.append(diff)
        out[key] = {"rows_equal": f"{same_rows}/{len(a)}", "positions_equal": round(equal / max(total, 1), 4),
                    "first_difference_median": statistics.median(first), "first_difference_min": min(first)}
    return out


def stage_times(adapter, run, cuda: bool) -> dict[str, float]:
    """Seconds per stage of one ``run()``: prefills, thinker and talker decode, DiT, vocoder, the rest.

    Profiling only: methods are wrapped for this one call, each call bracketed by a device synchronize.
    Eager decoding: the prefill is the first forward of each ``generate`` (the one over the prompt);
    graph decoding: the sessions' ``prefill`` and ``Decoder.run``.
    """
    from esn.decode import Decoder
    from esn_qwen_omni.decode import TalkerDecoding, ThinkerDecoding

    model = adapter.model
    t2w = model.token2wav
    spent: dict[str, float] = {}

    def timed(name, fn):
        @functools.wraps(fn)  # generate inspects forward's signature
        def wrapper(*args, **kwargs):
            key = name(*args, **kwargs) if callable(name) else name
            if key is None:
                return fn(*args, **kwargs)
            sync(cuda)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(cuda)
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - t0
            return out

        return wrapper

    def prompt_forward(stream):  # the prefill forward of generate: more than one position
        def key(*args, **kwargs):
            x = kwargs.get("inputs_embeds")
            x = kwargs.get("input_ids") if x is None else x
            return f"{stream}_prefill" if x is not None and x.shape[1] > 1 else None

        return key

    patches = [  # (owner, attribute, wrapper name)
        (model.thinker, "generate", "thinker"),
        (model.talker, "generate", "talker"),
        (model.thinker, "forward", prompt_forward("thinker")),
        (model.talker, "forward", prompt_forward("talker")),
        (t2w.code2wav_dit_model, "forward", "dit"),
        (t2w.code2wav_bigvgan_model, "forward", "vocoder"),
    ]
    class_patches = [
        (ThinkerDecoding, "prefill", "thinker_prefill"),
        (TalkerDecoding, "prefill", "talker_prefill"),
        (Decoder, "run", lambda self, *a, **k: "thinker_decode" if self.scope is model.thinker else "talker_decode"),
    ]
    saved = [(owner, attr, owner.__dict__.get(attr)) for owner, attr, _ in class_patches]
    try:
        for owner, attr, name in patches:
            setattr(owner, attr, timed(name, getattr(owner, attr)))
        for owner, attr, name in class_patches:
            setattr(owner, attr, timed(name, getattr(owner, attr)))
        sync(cuda)
        t0 = time.perf_counter()
        run()
        sync(cuda)
        total = time.perf_counter() - t0
    finally:
        for owner, attr, _ in patches:
            delattr(owner, attr)
        for owner, attr, original in saved:
            setattr(owner, attr, original)
    for stream in ("thinker", "talker"):  # eager: generate's total includes its prefill: split it
        if stream in spent:
            spent[f"{stream}_decode"] = spent.pop(stream) - spent.get(f"{stream}_prefill", 0.0)
    spent["other"] = total - sum(spent.values())
    return {**{k: round(v, 3) for k, v in sorted(spent.items())}, "total": round(total, 3)}


def capture_exact(adapter, reqs, base: dict) -> dict:
    """The graph replays against the same esn.decode steps run uncaptured: tokens must be equal."""
    from esn_qwen_omni.decode import Sessions

    config = fixed_config({**base, "decode": "graph"})
    out, kept = {}, adapter._sessions  # the timed rounds go on with the graphs captured so far
    for capture in (True, False):
        adapter._sessions = Sessions()  # fresh static buffers for each way
        adapter.capture_graphs = capture
        try:
            out[capture] = adapter.generate(reqs, config)
        finally:
            adapter.capture_graphs = None
    adapter._sessions = kept
    return agreement(out[True], out[False])


def dit_check(adapter, codes: torch.Tensor, cuda: bool) -> dict:
    """The DiT under bf16 autocast (and with TF32 matmuls) against float32: relative L2 of mel and audio.

    ``codes`` ``[G, n]`` are real generated codes; every row starts from the same seeded noise, as in
    the adapter. Relative L2 per row: ``||x - x_f32|| / ||x_f32||``, median and max over rows. On CUDA
    the graph-replayed DiT (``token2wav_graph``) is compared with the eager one too (``*_graph``).
    """
    from esn_qwen_omni.adapter import _dit_sample

    t2w = adapter.model.token2wav
    dit, vocoder = t2w.code2wav_dit_model, t2w.code2wav_bigvgan_model
    params = adapter.model.speaker_map["Chelsie"]
    g = codes.shape[0]
    cond = params["cond"].to(codes.device).float().expand(g, -1)
    mel = params["ref_mel"].to(codes.device).float().expand(g, -1, -1)
    before = torch.backends.cuda.matmul.allow_tf32
    ways = {"float32": (False, False, False), "tf32": (True, False, False), "bf16": (False, True, False)}
    if cuda:
        ways |= {"float32_graph": (False, False, True), "bf16_graph": (False, True, True)}
    results, times = {}, {}
    with torch.inference_mode():
        for name, (tf32, bf16, graphed) in ways.items():
            torch.backends.cuda.matmul.allow_tf32 = tf32
            graphs = {} if graphed else None
            for attempt in range(2 if graphed else 1):  # graphed: the second call replays (first captures)
                sync(cuda)
                t0 = time.perf_counter()
                spec = _dit_sample(dit, cond, mel, codes, 0, num_steps=T2W_STEPS, graphs=graphs, autocast=bf16).float()
                sync(cuda)
                times[name if not attempt else name + "_replay"] = round(time.perf_counter() - t0, 3)
            torch.backends.cuda.matmul.allow_tf32 = False
            results[name] = (spec, vocoder(spec).reshape(g, -1).float())
    torch.backends.cuda.matmul.allow_tf32 = before

    def rel(a, b):  # [G, ...] -> per-row relative L2
        r = ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).cpu()
        return {"median": float(r.median()), "max": float(r.max())}

    def versus(name, ref):
        return {"mel_rel_l2": rel(results[name][0], results[ref][0]), "wave_rel_l2": rel(results[name][1], results[ref][1])}

    out = {"rows": g, "dit_seconds": times, "tf32": versus("tf32", "float32"), "bf16": versus("bf16", "float32")}
    if cuda:
        out["float32_graph_vs_eager"] = versus("float32_graph", "float32")
        out["bf16_graph_vs_eager"] = versus("bf16_graph", "bf16")
    return out


def check_tiny(device: str) -> dict:
    """A tiny float32 model on the device, decoded eagerly and through captured graphs: equal tokens,
    equal recording counts, with a different condition per row. Fails loudly before any long run."""
    from common import random_mask
    from esn.adapters import GenerationConfig
    from esn.recording import GateRecorder
    from esn.steering import Condition, steer_rows

    adapter = build("tiny", device, dtype=torch.float32)
    reqs = requests(3, 1.0)
    layout = adapter.layout()
    conditions = [Condition(random_mask(layout, 0.05, seed=i), *STEER_METHODS[i]) for i in range(3)]
    runs = {}
    # the second graph run reuses the captured graphs; the last records with overlap=False (in order)
    for decode, overlap in (("eager", None), ("graph", None), ("graph", None), ("sync", False)):
        options = {"decode": {"sync": "graph", "eager": "generate"}.get(decode, decode), "token2wav_num_steps": 2, "talker_min_new_tokens": 2}
        config = GenerationConfig(max_new_tokens=12, max_audio_tokens=24, options=options)
        with steer_rows(adapter, conditions), GateRecorder(adapter, overlap=overlap) as rec:
            out = adapter.generate(reqs, config)
        runs.setdefault(decode, []).append((out, rec.stats(), adapter.__dict__.get("last_decode_info")))
    (eager, es, _), = runs["eager"]
    (_, ss, _), = runs["sync"]
    report = {"gate_kernel": gate_kernel_check(device)}
    for i, (graph, gs, info) in enumerate(runs["graph"]):
        report[f"graph_run{i + 1}"] = {
            "agreement": agreement(eager, graph),
            "counts_equal": bool(torch.equal(es.counts, gs.counts)),
            "tokens_equal": bool(torch.equal(es.tokens, gs.tokens)),
            "sums_max_abs_diff": float((es.sums - gs.sums).abs().max()),
            # the same recording with its reductions in order on the current stream: every bit equal
            "overlap_off_equal": all(bool(torch.equal(getattr(ss, k), getattr(gs, k)))
                                     for k in ("counts", "tokens", "sums", "sumsq")),
            "decode_info": info,
        }
        ok = all(r.info["text_ids"] == s.info["text_ids"] and r.info["audio_codes"] == s.info["audio_codes"]
                 for r, s in zip(eager, graph, strict=True))
        report[f"graph_run{i + 1}"]["ok"] = (ok and report[f"graph_run{i + 1}"]["counts_equal"]
                                             and report[f"graph_run{i + 1}"]["overlap_off_equal"])
        if not report[f"graph_run{i + 1}"]["ok"]:
            log(f"CHECK_TINY FAILED: graph and eager decoding differ: {report}")  # the run goes on: say so loudly
    return report


def gate_kernel_check(device: str) -> dict:
    """esn.gate_reduce on the device (the Triton kernel there) against its torch ops on the CPU, same
    gates: counts, float64 sums and sums of squares must be equal bit for bit."""
    from esn import gate_reduce

    out = {"kernel": gate_reduce.kernel_available() and torch.device(device).type == "cuda"}
    gen = torch.Generator().manual_seed(0)
    cases = {"prefill_bf16": ((16, 333, 1000), torch.bfloat16, 1), "chunk_bf16": ((9, 16, 1000), torch.bfloat16, 0),
             "prefill_fp32": ((4, 77, 300), torch.float32, 1)}
    for name, (shape, dtype, dim) in cases.items():
        g = torch.nn.functional.silu(torch.randn(shape, generator=gen) * 3).to(dtype)
        valid = torch.rand(shape[:2], generator=gen) > 0.2
        got = []
        for dev in (device, "cpu"):
            c = torch.zeros((shape[1 - dim], shape[2]), dtype=torch.int32, device=dev)
            s, q = c.double(), c.double()
            gate_reduce.reduce_gates(g.to(dev), valid.to(dev), dim, c, s, q)
            got.append([t.cpu() for t in (c, s, q)])
        out[name] = all(bool(torch.equal(a, b)) for a, b in zip(*got, strict=True))
    return out


def profile(run, cuda: bool, rows: int = 30) -> dict:
    """One call under torch.profiler: the ops with the most device (else host) time, as a text table."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        run()
        sync(cuda)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
    events = prof.key_averages()
    total = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events)
    return {"sorted_by": key, "device_total_ms": round(total / 1000, 1), "table": table.splitlines()}


def parse_plan(text: str, repeats: int) -> list[tuple[int, int, list[str]]]:
    """``"16:eager/plain,graph/plain;64x1:graph/plain"`` -> [(16, repeats, [...]), (64, 1, [...])]."""
    plan = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        head, _, names = part.partition(":")
        batch, _, rounds = head.partition("x")
        plan.append((int(batch), int(rounds) if rounds else repeats, [n.strip() for n in names.split(",") if n.strip()]))
    return plan


def barrier(spec: list[str] | None, name: str) -> None:
    """Wait until N processes have reached this point (files in a shared directory)."""
    if not spec:
        return
    folder, n = Path(spec[0]), int(spec[1])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.{platform.node()}.{id(folder)}.{time.time_ns()}").touch()
    while len(list(folder.glob(f"{name}.*"))) < n:
        time.sleep(0.05)


DEFAULT_PLAN = "2:eager/plain,graph/plain,graph/record,graph/steer,graph/rows,graph/rows_mixed,graph/rows+record,graph/plain/bf16"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=("tiny", "7b"), default="tiny")
    ap.add_argument("--plan", default=DEFAULT_PLAN, help="BATCH[xROUNDS]:VARIANT,...;BATCH:... (see above)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eager-repeats", type=int, default=None, help="rounds that include eager variants (default: all)")
    ap.add_argument("--rate", type=float, default=0.005, help="mask size as a fraction of all gate neurons")
    ap.add_argument("--token2wav-batch", type=int, default=0, help="rows per token2wav batch (0: the batch size)")
    ap.add_argument("--token2wav-tf32", action="store_true", help="adapter option token2wav_tf32")
    ap.add_argument("--breakdown", type=int, nargs="*", default=[], help="batch sizes: per-stage seconds, eager and graph")
    ap.add_argument("--dit-check", type=int, default=0, help="rows for the bf16/TF32 DiT deviation check (0: skip)")
    ap.add_argument("--capture-exact", action="store_true", help="graph replays vs the same steps uncaptured")
    ap.add_argument("--check-tiny", action="store_true", help="first: a tiny float32 model on the device, both ways")
    ap.add_argument("--profile", metavar="VARIANT", help="one call of VARIANT (first batch) under torch.profiler")
    ap.add_argument("--breakdown-variants", nargs="+", default=["eager/plain", "graph/plain"],
                    help="variants whose stages --breakdown times")
    ap.add_argument("--barrier", nargs=2, metavar=("DIR", "N"), help="start the timed rounds with N processes")
    ap.add_argument("--out", type=Path, help="write the JSON here after every step")
    ap.add_argument("--work", type=int, nargs=3, metavar=("TEXT", "CODEC", "ODE"),
                    help="smoke runs only: other fixed text/codec tokens and token2wav steps than 48 256 10")
    args = ap.parse_args()
    if args.work:
        global TEXT_TOKENS, CODEC_TOKENS, T2W_STEPS
        TEXT_TOKENS, CODEC_TOKENS, T2W_STEPS = args.work
    plan = parse_plan(args.plan, args.repeats)
    cuda = torch.device(args.device).type == "cuda"
    summary: dict = {
        "benchmark": "bench_qwen_omni",
        "size": args.size,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "work": {"input_s": SECONDS, "text_tokens": TEXT_TOKENS, "codec_tokens": CODEC_TOKENS, "token2wav_steps": T2W_STEPS},
        "token2wav_tf32": args.token2wav_tf32,
        "plan": args.plan,
        "results": {},
    }

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(summary, indent=2) + "\n")

    if args.check_tiny:
        t0 = time.perf_counter()
        summary["check_tiny"] = check_tiny(args.device)
        summary["check_tiny"]["seconds"] = round(time.perf_counter() - t0, 2)
        log(f"check_tiny: {json.dumps(summary['check_tiny'])[:600]}")
        save()

    from esn.masks import Mask

    t0 = time.perf_counter()
    adapter = build(args.size, args.device)
    summary["build_s"] = round(time.perf_counter() - t0, 2)
    log(f"built the {args.size} model in {summary['build_s']} s")
    layout = adapter.layout()
    k = max(1, int(args.rate * layout.n_neurons))
    rng = np.random.default_rng(0)
    masks = [Mask(np.sort(rng.choice(layout.n_neurons, k, replace=False)), layout) for _ in range(max(b for b, _, _ in plan))]
    summary.update(mask_neurons=k, n_neurons=layout.n_neurons)

    for batch, repeats, names in plan:
        reqs = requests(batch)
        base = {"token2wav_batch": args.token2wav_batch or batch, "token2wav_tf32": args.token2wav_tf32}
        variants = Variants(adapter, masks, base)
        runs = {name: variants.make(name, reqs) for name in names}
        res: dict = {"first_call": {}, "variants": {}}
        summary["results"][f"batch{batch}"] = res
        outputs = {}
        for name, run in runs.items():  # first calls: graph capture, warm-up; checks the fixed work
            sync(cuda)
            t1 = time.perf_counter()
            outputs[name] = run()
            sync(cuda)
            first = {"seconds": round(time.perf_counter() - t1, 3)}
            if name.startswith("graph"):
                first["decode_info"] = adapter.last_decode_info
            res["first_call"][name] = first
            log(f"batch {batch} first call {name}: {first}")
            assert all(r.info["text_tokens"] == TEXT_TOKENS and r.info["audio_tokens"] == CODEC_TOKENS
                       for r in outputs[name]), [(r.info["text_tokens"], r.info["audio_tokens"]) for r in outputs[name]]
            save()
        for a, b in (("eager/plain", "graph/plain"), ("eager/steer", "graph/steer"), ("eager/rows", "graph/rows")):
            if a in outputs and b in outputs:
                res.setdefault("agreement", {})[f"{a} vs {b}"] = agreement(outputs[a], outputs[b])
        if args.capture_exact and cuda and "graph/plain" in outputs:
            res["capture_exact"] = capture_exact(adapter, reqs, base)
            log(f"batch {batch} capture_exact: {res['capture_exact']}")
        save()
        barrier(args.barrier, f"batch{batch}")
        times: dict[str, list[float]] = {name: [] for name in runs}
        peaks: dict[str, int] = {}
        captures_before = {}
        eager_rounds = repeats if args.eager_repeats is None else args.eager_repeats
        for rep in range(repeats):
            names = [n for n in runs if rep < eager_rounds or not n.startswith("eager")]
            order = names[rep % len(names):] + names[: rep % len(names)]
            for name in order:
                sync(cuda)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t1 = time.perf_counter()
                runs[name]()
                sync(cuda)
                times[name].append(time.perf_counter() - t1)
                if cuda:
                    peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
                if name.startswith("graph"):  # a repeat must reuse the captured graphs
                    info = adapter.last_decode_info
                    captures_before[name] = captures_before.get(name, 0) + sum(bool(info[s]["captured"]) for s in info)
                log(f"batch {batch} round {rep} {name}: {times[name][-1]:.3f} s")
        base_name = "graph/plain" if "graph/plain" in times else next(iter(times))
        base_t = statistics.median(times[base_name])
        for name, ts in times.items():
            med = statistics.median(ts)
            paired = paired_ratio(ts, times[base_name])
            row = {
                "median_s": round(med, 4),
                "runs_s": [round(t, 3) for t in ts],
                "ratio": round(med / base_t, 4),
                "ratio_paired": paired["median"],
                "ratio_paired_ci90": paired["ci90"],
                "conversions_per_s": round(batch / med, 3),
                "tokens_per_s": round(batch * (TEXT_TOKENS + CODEC_TOKENS) / med, 1),
                "s_per_conversion": round(med / batch, 4),
            }
            if name in captures_before:
                row["captures_during_repeats"] = captures_before[name]
            if cuda:
                row["peak_gib"] = round(peaks[name] / 2**30, 3)
            res["variants"][name] = row
        res["baseline"] = base_name
        log(f"batch {batch}: " + ", ".join(f"{n} {r['median_s']:.3f} s ({r['conversions_per_s']:.2f} conv/s, x{r['ratio']:.3f})"
                                           for n, r in res["variants"].items()))
        save()
        if batch in args.breakdown:
            res["stage_seconds"] = {}
            for name in args.breakdown_variants:
                res["stage_seconds"][name] = stage_times(adapter, variants.make(name, reqs), cuda)
                log(f"batch {batch} stages {name}: {res['stage_seconds'][name]}")
                save()
        if args.profile and "profile" not in summary:
            summary["profile"] = {"variant": args.profile, "batch": batch,
                                  **profile(variants.make(args.profile, reqs), cuda)}
            log("\n".join(summary["profile"]["table"]))
            save()
        if args.dit_check and "dit_check" not in summary:
            codes = [torch.tensor(r.info["audio_codes"]) for r in next(iter(outputs.values()))[: args.dit_check]]
            summary["dit_check"] = dit_check(adapter, torch.stack(codes).to(adapter.device), cuda)
            log(f"dit_check: {summary['dit_check']}")
            save()
        del outputs
        if cuda:
            torch.cuda.empty_cache()
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
