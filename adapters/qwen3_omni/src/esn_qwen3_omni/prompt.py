"""The EVC prompt in Qwen3-Omni's ChatML, built by hand so audio-only use needs no video processor.

One system turn and one user turn holding the audio then the instruction::

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n<|audio_start|>{<|audio_pad|> x n}<|audio_end|>{instruction}<|im_end|>\\n
    <|im_start|>assistant\\n

``n`` is the audio encoder's output length for the clip's log-mel frames (100 a second), transformers'
``_get_feat_extract_output_lengths`` with the checkpoint's ``n_window`` (13 tokens per 100 frames). The
talker recognises the user turn by the token after ``<|im_start|>`` (``config.user_token_id``) and the
reply by ``<|im_start|>`` followed by ``config.assistant_token_id``, so the prompt must tokenize that way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from esn.decode.policy import reply_text
from esn.errors import EsnError

SAMPLE_RATE = 16_000
MIN_SAMPLES = 800  # 0.05 s: fewer frames leave the audio encoder nothing to emit
AUDIO_START, AUDIO_PAD, AUDIO_END = "<|audio_start|>", "<|audio_pad|>", "<|audio_end|>"
IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


@dataclass
class Batch:
    """Model inputs for a left-padded batch: ``input_ids``/``attention_mask`` ``[batch, pos]``,
    ``input_features`` ``[batch, 128, frames]``, ``feature_attention_mask`` ``[batch, frames]``."""

    tensors: dict[str, Any]
    prompt_lengths: list[int]


class PromptBuilder:
    """Tokenizes EVC prompts with the checkpoint's tokenizer, checked against its config's token ids."""

    def __init__(self, tokenizer: Any, features: Any, config: Any):
        self.tokenizer = tokenizer
        self.features = features
        thinker = config.thinker_config
        want = {AUDIO_PAD: thinker.audio_token_id, AUDIO_START: thinker.audio_start_token_id,
                IM_START: config.im_start_token_id, IM_END: config.im_end_token_id}
        for token, expected in want.items():
            got = tokenizer.convert_tokens_to_ids(token)
            if got != expected:
                raise EsnError(f"the checkpoint's tokenizer maps {token} to {got}, its config expects {expected}; "
                               "is it a Qwen3-Omni tokenizer?")
        self.im_end = int(config.im_end_token_id)
        self.pad = int(tokenizer.convert_tokens_to_ids(PAD))
        self.n_window = int(thinker.audio_config.n_window)
        for role, expected in (("user", config.user_token_id), ("assistant", config.assistant_token_id)):
            first = self._text(role)[0]
            if first != expected:
                raise EsnError(f"the tokenizer starts the role {role!r} with id {first}, the config expects "
                               f"{expected}: the talker would not find the {role} turn")

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end the reply; the pad token fills rows that finished early in a batch."""
        return (self.im_end, self.pad)

    def _text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def audio_tokens(self, frames) -> list[int]:
        """Audio tokens per request: the audio encoder's output length for its feature frames."""
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
            _get_feat_extract_output_lengths,
        )

        return [int(n) for n in _get_feat_extract_output_lengths(frames, self.n_window).tolist()]

    def prompt(self, system: str, instruction: str, n_audio: int) -> str:
        """The ChatML prompt: system turn, user turn with ``n_audio`` audio pads and the instruction, assistant."""
        return (f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{AUDIO_START}{AUDIO_PAD * n_audio}{AUDIO_END}"
                f"{instruction}{IM_END}\n{IM_START}assistant\n")

    def batch(self, audios: Sequence[np.ndarray], system: str, instructions: Sequence[str], ids: Sequence[str]) -> Batch:
        """Left-padded model inputs for 16 kHz requests (audio features, ids, masks); too short audio is refused."""
        for audio, rid in zip(audios, ids, strict=True):
            if audio.shape[0] < MIN_SAMPLES:
                raise EsnError(f"request {rid or '?'}: audio is too short ({audio.shape[0]} samples); give at least 0.05 s")
        feats = self.features(list(audios), sampling_rate=SAMPLE_RATE, padding="longest", truncation=False,
                              return_attention_mask=True, return_tensors="pt")
        counts = self.audio_tokens(feats["attention_mask"].sum(-1))
        prompts = [self.prompt(system, text, n) for text, n in zip(instructions, counts, strict=True)]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        if self.tokenizer.padding_side != "left":
            raise EsnError("the tokenizer must pad on the left (generation continues every row at the right end)")
        tensors = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                   "input_features": feats["input_features"], "feature_attention_mask": feats["attention_mask"]}
        return Batch(tensors, [int(n) for n in enc["attention_mask"].sum(-1)])

    def decode(self, generated: Sequence[int]) -> tuple[str, int]:
        """Text of the reply up to its first stop token (special tokens dropped) and its token count."""
        return reply_text(self.tokenizer, generated, self.stop_ids)
