"""A decode step for a plain transformers decoder-only LM (``*ForCausalLM``): static KV cache, 4D mask.

Model-agnostic in the sense of transformers' common interface: ``model(input_ids, attention_mask,
position_ids, cache, use_cache)`` with 1D positions. Adapters of multimodal models write their own step
over the same pieces (see ``esn_qwen_omni.decode``); benchmarks and tests use this one.
"""

from __future__ import annotations

import torch
from torch import nn

from esn.decode.engine import Decoded, Decoder, DecodeState, Greedy
from esn.decode.static import StaticKV
from esn.errors import EsnError


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``generate``'s positions for a left-padded prompt ``[B, P]``: count real tokens, 0 on padding."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def left_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` each row's left padding in ``attention_mask`` ``[B, P]``: what ``generate``'s repetition
    penalty skips (``prompt_ignore_length``), :meth:`Decoder.run`'s ``penalty_ignore``."""
    return (attention_mask != 0).int().argmax(dim=1)


class CausalLMDecoding:
    """Greedy ``generate`` for a ``*ForCausalLM`` at a fixed batch size, through :class:`Decoder`.

    Static buffers, reused by every call: a ``StaticCache`` of ``max_len`` positions, the key mask
    ``[B, max_len]`` (prompt padding, then every generated position), the per-row next position.
    Each decode step feeds ``state.ids`` with the 4D mask ``[B, 1, 1, max_len]`` (keys up to the current
    position); a 4D mask reaches attention unchanged, so no host-side mask logic runs in the step.
    """

    def __init__(self, model: nn.Module, *, batch: int, max_len: int, greedy: Greedy, capture: bool | None = None):
        self.model = model
        self.max_len = max_len
        self.greedy = greedy
        device = next(model.parameters()).device
        with torch.inference_mode():
            self.kv = StaticKV(model.config, batch, max_len, device)  # cache and key mask [B, L]
            self.next_position = torch.zeros((batch, 1), dtype=torch.long, device=device)  # [B, 1]
        vocab = model.get_output_embeddings().out_features
        self.decoder = Decoder(model, self.step, batch=batch, vocab=vocab, greedy=greedy, device=device, capture=capture)

    def step(self, state: DecodeState) -> torch.Tensor:
        """One decode step over the static cache: logits ``[B, V]`` for ``state.ids`` at ``state.step``."""
        out = self.model(
            input_ids=state.ids,  # [B, 1]
            attention_mask=self.kv.step_mask(state),  # [B, 1, 1, L] bool, True = attend
            position_ids=self.next_position + state.step,  # [B, 1]
            cache=self.kv.cache,
            use_cache=True,
        )
        return out.logits[:, -1]  # [B, V]

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt ``[B, P]`` (left-padded) into the cache; the last position's logits ``[B, V]``."""
        batch, p = input_ids.shape
        if batch != self.decoder.batch:
            raise EsnError(f"this decoding was built for batch {self.decoder.batch}, got {batch}")
        if p + self.greedy.max_new_tokens > self.max_len:
            raise EsnError(f"prompt {p} + {self.greedy.max_new_tokens} new tokens exceed max_len {self.max_len}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.inference_mode():
            self.kv.start(attention_mask)
            positions = prompt_positions(attention_mask)
            self.next_position.copy_(positions[:, -1:] + 1)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,  # 2D: stream roots see the padding, as in generate
                position_ids=positions,
                cache=self.kv.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            return out.logits[:, -1]

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Decoded:
        """Prompt ``[B, P]`` (left-padded) -> new tokens ``Decoded.tokens`` ``[B, n]``, as ``generate``."""
        ignore = None if attention_mask is None else left_padding(attention_mask)
        return self.decoder.run(self.prefill(input_ids, attention_mask), prompt_ids=input_ids, penalty_ignore=ignore)
