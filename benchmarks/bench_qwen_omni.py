"""EVC generation through QwenOmniAdapter: plain vs recording vs steering, side by side in one process.

    python benchmarks/bench_qwen_omni.py --device cpu --size tiny            # any machine, tiny model
    python benchmarks/bench_qwen_omni.py --device cuda --size 7b             # H100/H200, Qwen2.5-Omni-7B sizes

The 7b model has random weights with the released Qwen2.5-Omni-7B sizes (thinker: 28 x 3584/18944,
vocab 152064, audio encoder 32 x 1280, vision 32 x 1280; talker: 24 x 896/18944, codec vocab 8448;
token2wav DiT 22 x 1024 + BigVGAN), built directly on the device in bf16 (token2wav fp32, as the model
does), no CPU init, no download. The tokenizer is esn's tiny byte-level one (ids don't matter with
random weights).

Fixed work per conversion: a 3 s input, exactly 48 text tokens and 256 codec tokens (min = max new
tokens), 10 token2wav ODE steps. Per batch size (1 and 16), interleaved variants:

- ``plain``: adapter.generate (baseline);
- ``record``: the same under ``GateRecorder`` (both streams);
- ``steer``: one mask (r = 0.5% of all gate neurons, alpha 1) for every row;
- ``rows`` (batch > 1): a different mask per row (``steer_rows``), the evaluation grid's case;
- ``rows+record`` (batch > 1): per-row masks and recording together.

Reports per variant: median seconds per generate, ratio to plain, conversions/s, generated tokens/s
(text + codec), peak device memory (CUDA) and its ratio to plain. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import paired_ratio

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


def build(size: str, device: str, seed: int = 0):
    from esn_qwen_omni import QwenOmniAdapter
    from esn_qwen_omni.tiny import speaker_bos, tiny_config, tiny_tokenizer
    from transformers import Qwen2_5OmniForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = tiny_config() if size == "tiny" else config_7b()
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5OmniForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation="sdpa"
        )
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


def stage_times(adapter, run, cuda: bool) -> dict[str, float]:
    """Seconds spent in thinker.generate, talker.generate, the DiT and the vocoder during one ``run()``.

    Profiling only: the methods are wrapped on the instances for this one call, each call bracketed by
    a device synchronize (the DiT's 40 forwards of a 10-step ODE are summed).
    """
    model = adapter.model
    t2w = model.token2wav
    owners = {
        "thinker": (model.thinker, "generate"),
        "talker": (model.talker, "generate"),
        "dit": (t2w.code2wav_dit_model, "forward"),
        "vocoder": (t2w.code2wav_bigvgan_model, "forward"),
    }
    spent = dict.fromkeys(owners, 0.0)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            spent[name] += time.perf_counter() - t0
            return out

        return wrapper

    for name, (owner, attr) in owners.items():
        setattr(owner, attr, timed(name, getattr(owner, attr)))
    try:
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        total = time.perf_counter() - t0
    finally:
        for owner, attr in owners.values():
            delattr(owner, attr)
    return {**{k: round(v, 3) for k, v in spent.items()}, "total": round(total, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=("tiny", "7b"), default="tiny")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rate", type=float, default=0.005, help="mask size as a fraction of all gate neurons")
    ap.add_argument(
        "--breakdown", action="store_true", help="also time the thinker, talker, DiT and vocoder of plain"
    )
    ap.add_argument(
        "--token2wav-batch",
        type=int,
        default=1,
        help="rows per token2wav batch (adapter option token2wav_batch; 1 = row by row); when > 1 the "
        "row-by-row float32 plain run (the default settings) is timed beside it as plain_t2w_rowwise "
        "unless --variants leaves it out",
    )
    ap.add_argument(
        "--token2wav-tf32", action="store_true", help="adapter option token2wav_tf32 (TF32 matmuls in token2wav)"
    )
    ap.add_argument(
        "--variants",
        nargs="+",
        default=["record", "steer", "rows", "rows+record", "plain_t2w_rowwise"],
        help="variants besides plain",
    )
    args = ap.parse_args()

    from esn.adapters import EVCRequest, GenerationConfig
    from esn.masks import Mask
    from esn.recording import GateRecorder
    from esn.steering import Condition, steer, steer_rows

    t0 = time.perf_counter()
    adapter = build(args.size, args.device)
    build_s = time.perf_counter() - t0
    print(f"built the {args.size} model in {build_s:.1f} s", file=sys.stderr, flush=True)
    cuda = torch.device(args.device).type == "cuda"
    layout = adapter.layout()
    k = max(1, int(args.rate * layout.n_neurons))
    rng = np.random.default_rng(0)
    masks = [
        Mask(np.sort(rng.choice(layout.n_neurons, k, replace=False)), layout) for _ in range(max(args.batch))
    ]
    config = GenerationConfig(
        max_new_tokens=TEXT_TOKENS,
        max_audio_tokens=CODEC_TOKENS,
        options={
            "thinker_min_new_tokens": TEXT_TOKENS,
            "talker_min_new_tokens": CODEC_TOKENS,
            "token2wav_num_steps": T2W_STEPS,
            "token2wav_batch": args.token2wav_batch,
            "token2wav_tf32": args.token2wav_tf32,
        },
    )
    emotions = ("happy", "angry", "sad", "surprise")
    t = np.arange(int(SECONDS * 16_000)) / 16_000

    def requests(batch):
        return [
            EVCRequest(
                (0.3 * np.sin(2 * np.pi * (100 + 10 * i) * t)).astype(np.float32), emotions[i % 4], id=str(i)
            )
            for i in range(batch)
        ]

    results = {}
    breakdown = {}
    for batch in args.batch:
        reqs = requests(batch)
        conds = [Condition(masks[i], "steer", 1.0) for i in range(batch)]

        def plain(reqs=reqs):
            return adapter.generate(reqs, config)

        def record(reqs=reqs):
            with GateRecorder(adapter) as rec:
                out = adapter.generate(reqs, config)
            rec.stats()
            return out

        def steered(reqs=reqs):
            with steer(adapter, masks[0], "steer", 1.0):
                return adapter.generate(reqs, config)

        def rows(reqs=reqs, conds=conds):
            with steer_rows(adapter, conds):
                return adapter.generate(reqs, config)

        def rows_record(reqs=reqs, conds=conds):
            with steer_rows(adapter, conds), GateRecorder(adapter) as rec:
                out = adapter.generate(reqs, config)
            rec.stats()
            return out

        variants = {"plain": plain, "record": record, "steer": steered}
        if batch > 1:
            variants |= {"rows": rows, "rows+record": rows_record}
        variants = {k: v for k, v in variants.items() if k == "plain" or k in args.variants}
        if args.token2wav_batch > 1 and batch > 1 and "plain_t2w_rowwise" in args.variants:
            rowwise = config.model_copy(
                update={"options": {**config.options, "token2wav_batch": 1, "token2wav_tf32": False}}
            )
            variants["plain_t2w_rowwise"] = lambda reqs=reqs, rowwise=rowwise: adapter.generate(reqs, rowwise)
        out = plain()  # warm-up, and a check that the fixed work is what was asked for
        assert all(
            r.info["text_tokens"] == TEXT_TOKENS and r.info["audio_tokens"] == CODEC_TOKENS for r in out
        ), [(r.info["text_tokens"], r.info["audio_tokens"]) for r in out]
        times = {name: [] for name in variants}
        peaks = {}
        for rep in range(args.repeats):
            names = list(variants)[rep % len(variants) :] + list(variants)[: rep % len(variants)]
            for name in names:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t1 = time.perf_counter()
                variants[name]()
                if cuda:
                    torch.cuda.synchronize()
                    peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
                times[name].append(time.perf_counter() - t1)
                print(f"batch {batch} round {rep} {name}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
        base = statistics.median(times["plain"])
        rows_out = {}
        for name, ts in times.items():
            med = statistics.median(ts)
            paired = paired_ratio(ts, times["plain"])
            rows_out[name] = {
                "median_s": round(med, 4),
                "ratio": round(med / base, 4),
                "ratio_paired": paired["median"],
                "ratio_paired_ci90": paired["ci90"],
                "conversions_per_s": round(batch / med, 4),
                "tokens_per_s": round(batch * (TEXT_TOKENS + CODEC_TOKENS) / med, 2),
            }
            if cuda:
                rows_out[name]["peak_gib"] = round(peaks[name] / 2**30, 3)
                rows_out[name]["peak_ratio"] = round(peaks[name] / peaks["plain"], 4)
        results[f"batch{batch}"] = rows_out
        if args.breakdown:
            breakdown[f"batch{batch}"] = stage_times(
                adapter, lambda reqs=reqs: adapter.generate(reqs, config), cuda
            )

    summary = {
        "benchmark": "bench_qwen_omni",
        "size": args.size,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "work": {
            "input_s": SECONDS,
            "text_tokens": TEXT_TOKENS,
            "codec_tokens": CODEC_TOKENS,
            "token2wav_steps": T2W_STEPS,
        },
        "token2wav_batch": args.token2wav_batch,
        "token2wav_tf32": args.token2wav_tf32,
        "mask_neurons": k,
        "n_neurons": layout.n_neurons,
        "build_s": round(build_s, 2),
        "results": results,
    }
    if breakdown:
        summary["stage_seconds"] = breakdown
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
