"""The EVC prompt, built by hand so that audio-only use needs no image/video processor.

Qwen2.5-Omni's chat template for one system turn and one user turn holding audio then text is::

    <|im_start|>system\n{system}<|im_end|>\n
    <|im_start|>user\n<|audio_bos|>{<|AUDIO|> x n}<|audio_eos|>{instruction}<|im_end|>\n
    <|im_start|>assistant\n

``n`` is the number of audio-encoder outputs: 100 log-mel frames per second of 16 kHz audio, halved
twice (``((L - 1) // 2 + 1 - 2) // 2 + 1``), i.e. 25 tokens per second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from esn.adapters import CONVERSION_SYSTEM_PROMPT
from esn.decode.policy import reply_text
from esn.errors import EsnError

# Qwen's own speech-output prompt: the model card says speech output needs exactly this system prompt.
SPEECH_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)
SYSTEM_PROMPTS = {"speech": SPEECH_PROMPT, "conversion": CONVERSION_SYSTEM_PROMPT}

SAMPLE_RATE = 16_000
MAX_SECONDS = 30.0  # the Whisper-style feature extractor holds 30 s; longer input would be cut silently
MIN_SAMPLES = 800  # 0.05 s: fewer frames leave the audio encoder nothing to emit
TURN_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def system_prompt(value: str | None) -> str:
    """``None`` -> the speech-output prompt; a preset name (``speech``, ``conversion``) or literal text."""
    if value is None:
        return SPEECH_PROMPT
    return SYSTEM_PROMPTS.get(value, value)


def audio_token_count(frames: int) -> int:
    """Audio-encoder outputs for ``frames`` valid log-mel frames (100 a second)."""
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


@dataclass
class Batch:
    """Model inputs for a left-padded batch: ``input_ids``/``attention_mask`` ``[batch, pos]``,
    ``input_features`` ``[batch, 128, 3000]``, ``feature_attention_mask`` ``[batch, 3000]``."""

    tensors: dict[str, Any]
    prompt_lengths: list[int]


class PromptBuilder:
    """Tokenizes EVC prompts with the checkpoint's tokenizer and the audio ids from its config."""

    def __init__(self, tokenizer: Any, thinker_config: Any):
        from transformers import WhisperFeatureExtractor

        self.tokenizer = tokenizer
        self.features = WhisperFeatureExtractor(feature_size=128, sampling_rate=SAMPLE_RATE)
        ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in TURN_TOKENS}
        unknown = getattr(tokenizer, "unk_token_id", None)
        missing = [tok for tok, i in ids.items() if i is None or (unknown is not None and i == unknown)]
        if missing:
            raise EsnError(f"the checkpoint's tokenizer lacks the chat tokens {missing}; is it a Qwen2.5-Omni tokenizer?")
        self.im_end = ids["<|im_end|>"]
        self.pad = ids["<|endoftext|>"]
        self.audio = int(thinker_config.audio_token_index)
        self.audio_bos = int(thinker_config.audio_start_token_id)
        self.audio_eos = int(thinker_config.audio_end_token_id)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end the reply; the pad token fills rows that finished early in a batch."""
        return (self.im_end, self.pad)

    def _text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, system: str, instruction: str, n_audio: int) -> list[int]:
        """Token ids of one EVC prompt with ``n_audio`` audio placeholders (the layout in the module docstring)."""
        head = self._text(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n")
        tail = self._text(f"{instruction}<|im_end|>\n<|im_start|>assistant\n")
        return head + [self.audio_bos] + [self.audio] * n_audio + [self.audio_eos] + tail

    def batch(self, audios: Sequence[np.ndarray], system: str, instructions: Sequence[str], ids: Sequence[str]) -> Batch:
        """Left-padded ``input_ids``/``attention_mask`` ``[B, L]`` and audio features of a batch; checks each audio's length."""
        import torch

        for audio, rid in zip(audios, ids, strict=True):
            seconds = audio.shape[0] / SAMPLE_RATE
            if seconds > MAX_SECONDS:
                raise EsnError(
                    f"request {rid or '?'}: audio is {seconds:.1f} s; Qwen2.5-Omni's audio input holds at most "
                    f"{MAX_SECONDS:.0f} s (cut it into utterances)"
                )
            if audio.shape[0] < MIN_SAMPLES:
                raise EsnError(f"request {rid or '?'}: audio is too short ({audio.shape[0]} samples); give at least 0.05 s")
        feats = self.features(
            list(audios), sampling_rate=SAMPLE_RATE, return_attention_mask=True, padding="max_length",
            return_tensors="pt",
        )
        counts = [audio_token_count(int(n)) for n in feats["attention_mask"].sum(-1)]
        rows = [self.prompt_ids(system, text, n) for text, n in zip(instructions, counts, strict=True)]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: generation continues every row from the right end
            input_ids[i, width - len(row):] = torch.tensor(row)
            attention_mask[i, width - len(row):] = 1
        tensors = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "input_features": feats["input_features"],
            "feature_attention_mask": feats["attention_mask"],
        }
        return Batch(tensors, [len(r) for r in rows])

    def decode(self, generated: Sequence[int]) -> tuple[str, int]:
        """Text of the reply up to its first stop token (special tokens dropped) and its token count."""
        return reply_text(self.tokenizer, generated, self.stop_ids)
