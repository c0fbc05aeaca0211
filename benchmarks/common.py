"""Shared benchmark helpers: random-weight Qwen2 decoders of named sizes and side-by-side timing.

Every benchmark reports times as ratios to a baseline measured in the same process, interleaved
(baseline, variant, baseline, variant, ...) so that clock drift and thermal state hit both alike.
No downloads: models are built from a config with random weights, directly on the target device.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Qwen2.5-Omni-7B thinker text decoder sizes (Qwen2 architecture).
SIZES: dict[str, dict] = {
    "tiny": dict(
        num_hidden_layers=4,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=2048,
    ),
    "small": dict(
        num_hidden_layers=8,
        hidden_size=512,
        intermediate_size=1536,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=4096,
        max_position_embeddings=4096,
    ),
    "thinker7b": dict(
        num_hidden_layers=28,
        hidden_size=3584,
        intermediate_size=18944,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
    ),
    # Qwen2.5-Omni-7B talker decoder (codec tokens): narrow, with a wide MLP and head_dim 128 != 896 / 12.
    "talker7b": dict(
        num_hidden_layers=24,
        hidden_size=896,
        intermediate_size=18944,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=8448,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
    ),
}


# The per-row variants' methods, cycled over the rows: (method, alpha).
STEER_METHODS = (("steer", 1.0), ("add", 0.5), ("clamp", 0.5), ("deactivate", None))


def random_mask(layout, rate: float, seed: int):
    """An ``esn.masks.Mask`` of ``rate`` of all the layout's neurons (at least one), uniformly at random."""
    import numpy as np
    from esn.masks import Mask

    rng = np.random.default_rng(seed)
    k = max(1, int(rate * layout.n_neurons))
    return Mask(rng.choice(layout.n_neurons, size=k, replace=False), layout, {"seed": seed})


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def build_qwen2(size: str = "tiny", *, device: str = "cpu", dtype: torch.dtype | None = None, seed: int = 0):
    """A random-weight ``Qwen2ForCausalLM`` of a named size, initialised directly on ``device``.

    Built under ``torch.device(device)`` in the target dtype, so a 7B model never touches CPU memory
    (no slow fp32 CPU init). ``eos_token_id`` is None: benchmarks force a fixed length anyway.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if size not in SIZES:
        raise SystemExit(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    dtype = dtype or default_dtype(device)
    config = Qwen2Config(**SIZES[size], tie_word_embeddings=False, use_cache=True)
    config.eos_token_id = None
    config.pad_token_id = 0
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def random_prompts(model, batch: int, prompt_len: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask`` ``[batch, prompt_len]`` of random tokens (no padding)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt_len), generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def greedy(model, inputs: dict[str, torch.Tensor], new_tokens: int) -> torch.Tensor:
    """Plain greedy generate of exactly ``new_tokens`` tokens per row."""
    with torch.inference_mode():
        return model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_side_by_side(
    variants: dict[str, Callable[[], object]],
    *,
    baseline: str,
    repeats: int = 5,
    warmup: int = 1,
    device: str = "cpu",
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, dict[str, float]]:
    """Run each variant ``warmup`` times, then ``repeats`` rounds interleaved; report medians.

    Returns ``{name: {"median_s", "min_s", "ratio", "ratio_min"}}`` where ``ratio`` is the median time
    over the baseline's median time (1.00 = no overhead) and ``ratio_min`` the same for the fastest
    run. Each call is bracketed by a device synchronize. ``clock`` may be ``time.process_time`` on a
    shared CPU (single-threaded torch), where other processes' load would swamp wall-clock ratios.
    """
    if baseline not in variants:
        raise ValueError(f"baseline {baseline!r} is not one of {sorted(variants)}")
    for _ in range(warmup):
        for fn in variants.values():
            fn()
            sync(device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(repeats):
        # Rotate the order each round so no variant always runs right after another.
        names = list(variants)
        names = names[r % len(names) :] + names[: r % len(names)]
        for name in names:
            sync(device)
            t0 = clock()
            variants[name]()
            sync(device)
            times[name].append(clock() - t0)
    base = statistics.median(times[baseline])
    base_min = min(times[baseline])
    out = {}
    for name, ts in times.items():
        paired = paired_ratio(ts, times[baseline])
        out[name] = {
            "median_s": round(statistics.median(ts), 5),
            "min_s": round(min(ts), 5),
            "ratio": round(statistics.median(ts) / base, 4),
            "ratio_min": round(min(ts) / base_min, 4),  # less sensitive to load from other processes
            "ratio_paired": paired["median"],
            "ratio_paired_ci90": paired["ci90"],
        }
    return out


def paired_ratio(times: list[float], base: list[float], *, seed: int = 0, resamples: int = 2000) -> dict:
    """Median over rounds of ``times[r] / base[r]`` and a seeded bootstrap 90% interval of that median.

    Each round runs every variant once, close together, so a round's ratio cancels drift that is slow
    compared with a round (clock boost, other tenants); the interval says how far the noise left reaches.
    """
    import numpy as np

    r = np.asarray(times, dtype=float) / np.asarray(base, dtype=float)
    boot = np.median(np.random.default_rng(seed).choice(r, size=(resamples, r.size)), axis=1)
    return {
        "median": round(float(np.median(r)), 4),
        "ci90": [round(float(q), 4) for q in np.quantile(boot, [0.05, 0.95])],
    }


class OpCounter(TorchDispatchMode):
    """Counts non-view aten ops (about one kernel launch each on CUDA)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))
