"""The static pieces every adapter's decode steps share: a KV cache with its key mask, length buckets,
and the generation settings ``esn.decode`` does not reproduce (sessions kept across ``generate`` calls:
``esn.decode.policy``)."""

from __future__ import annotations

from typing import Any

import torch

from esn.decode.engine import DecodeState
from esn.errors import EsnError

LENGTH_BUCKET = 64  # cache lengths are rounded up to this, so prompts of similar length share graphs
# generate settings the static steps do not reproduce: decoding with any of them set is refused
UNSUPPORTED = ("no_repeat_ngram_size", "bad_words_ids", "sequence_bias", "begin_suppress_tokens",
               "forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty",
               "encoder_repetition_penalty", "epsilon_cutoff", "eta_cutoff")


def bucket(n: int) -> int:
    """``n`` rounded up to a multiple of ``LENGTH_BUCKET``."""
    return -(-n // LENGTH_BUCKET) * LENGTH_BUCKET


def check_generation_config(config: Any, what: str, extra: tuple[str, ...] = ()) -> None:
    """EsnError if a (sub-)model's generation config asks for a processor ``decode='graph'`` lacks
    (``UNSUPPORTED``, plus an adapter's ``extra`` names)."""
    for name in UNSUPPORTED + extra:
        value = getattr(config, name, None)
        if value not in (None, 0, 1.0, [], ()):
            raise EsnError(f"the {what}'s generation config sets {name}={value!r}, which decode='graph' does not "
                           "reproduce; use decode='generate'")


class StaticKV:
    """A ``StaticCache`` of ``max_len`` positions and the key mask ``[B, L]`` of its positions."""

    def __init__(self, config: Any, batch: int, max_len: int, device: torch.device):
        from transformers import StaticCache

        self.batch, self.max_len = batch, max_len
        self.cache = StaticCache(config=config, max_cache_len=max_len)
        self.kv_index = torch.arange(max_len, device=device)  # [L]
        self.kv_allowed = torch.ones((batch, max_len), dtype=torch.bool, device=device)  # [B, L]
        self.prompt_len = torch.zeros(1, dtype=torch.long, device=device)

    def start(self, mask: torch.Tensor) -> None:
        """A new prompt with key mask ``[B, P]``: empty cache, padding masked, positions after it open."""
        p = mask.shape[1]
        if p > self.max_len:
            raise EsnError(f"prompt of {p} positions does not fit a cache of {self.max_len}")
        self.cache.reset()
        self.kv_allowed.fill_(True)
        self.kv_allowed[:, :p] = mask.bool()
        self.prompt_len.fill_(p)

    def step_mask(self, state: DecodeState) -> torch.Tensor:
        """``[B, 1, 1, L]`` bool: the prompt's real keys and every position up to this step's."""
        cur = self.prompt_len + state.step
        return (self.kv_allowed & (self.kv_index <= cur)).view(self.batch, 1, 1, self.max_len)
