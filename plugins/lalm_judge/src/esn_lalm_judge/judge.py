"""Qwen3-Omni-MoE as a five-way multiple-choice emotion judge (the paper's second judge).

Only the thinker runs (text out, greedy); the talker and code2wav are never built, so a real
checkpoint loads without their weights. The prompt is ChatML as Qwen3-Omni uses it: a system turn,
then a user turn holding the audio (source first, then the converted speech, when sources are
given) and the question of ``answers.question``; the answer is read by ``answers.parse_answer``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from esn.audio import MODEL_RATE, prepare_audio
from esn.emotions import EMOTIONS
from esn.errors import EsnError
from esn.judges import Audio, Judge, Judgement

from esn_lalm_judge.answers import SYSTEM_PROMPT, parse_answer, question

DEFAULT_MODEL = "Qwen/Qwen3-Omni-30B-A3B-Instruct"
MODEL_TYPE = "qwen3_omni_moe"
AUDIO_START, AUDIO_PAD, AUDIO_END = "<|audio_start|>", "<|audio_pad|>", "<|audio_end|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def chat_prompt(audio_tokens: Sequence[int], with_source: bool) -> str:
    """The ChatML text with ``audio_tokens[i]`` placeholders for audio i, ending at the assistant turn."""
    audio = "".join(f"{AUDIO_START}{AUDIO_PAD * n}{AUDIO_END}" for n in audio_tokens)
    return (f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n"
            f"{IM_START}user\n{audio}{question(with_source)}{IM_END}\n"
            f"{IM_START}assistant\n")


def read_config(path: Path) -> dict:
    """A checkpoint folder's config.json, checked to be a Qwen3-Omni-MoE model."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise EsnError(f"{path} has no config.json: not a transformers checkpoint of {DEFAULT_MODEL}")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise EsnError(f"{config_file} is not valid JSON: {exc}") from None
    if config.get("model_type") != MODEL_TYPE:
        raise EsnError(f"{path} holds a {config.get('model_type')!r} model; the LALM judge needs a "
                       f"{MODEL_TYPE!r} checkpoint such as {DEFAULT_MODEL}")
    return config


class LalmJudge(Judge):
    """Asks Qwen3-Omni which of the five emotions the (converted) speech expresses."""

    name: ClassVar[str] = "lalm_judge"
    kind: ClassVar[str] = "emotion"
    labels: ClassVar[tuple[str, ...]] = EMOTIONS

    def __init__(self, model: Any, tokenizer: Any, features: Any, *, max_new_tokens: int = 16,
                 batch_size: int = 4, use_sources: bool = True):
        self.model = model  # Qwen3OmniMoeForConditionalGeneration without talker
        self.tokenizer = tokenizer
        self.features = features  # WhisperFeatureExtractor (128 mel bins, 16 kHz)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.use_sources = use_sources
        self.unparseable = 0  # answers that named no single option, over this judge's life

    @classmethod
    def load(cls, source: str | None = None, *, device: str = "cpu", dtype: str = "auto",
             max_new_tokens: int = 16, batch_size: int = 4, use_sources: bool = True,
             **options: Any) -> LalmJudge:
        """Load a local Qwen3-Omni-MoE checkpoint directory (or a hub id, downloaded if not cached)."""
        if options:
            raise EsnError(f"lalm_judge: unknown options {', '.join(sorted(options))}")
        if max_new_tokens < 1 or batch_size < 1:
            raise EsnError(f"lalm_judge: max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
        source = source or DEFAULT_MODEL
        path = Path(source).expanduser()
        if path.exists() or source.startswith((".", "/", "~")):
            if not path.is_dir():
                raise EsnError(f"LALM judge checkpoint directory not found: {path}")
            read_config(path)
            source = str(path)
        import torch
        from transformers import AutoTokenizer, Qwen3OmniMoeForConditionalGeneration, WhisperFeatureExtractor

        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype, None)
        if torch_dtype is None:
            raise EsnError(f"lalm_judge: unknown dtype {dtype!r} (auto, float32, bfloat16, float16)")
        try:
            model, info = Qwen3OmniMoeForConditionalGeneration.from_pretrained(
                source, enable_audio_output=False, dtype=torch_dtype, output_loading_info=True)
            tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left")
            features = WhisperFeatureExtractor.from_pretrained(source)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise EsnError(f"cannot load the LALM judge from {source}: {type(exc).__name__}: {exc}") from None
        # transformers fills missing weights with random ones and only logs it: refuse instead
        missing = [k for k in info["missing_keys"] if not k.startswith(("talker.", "code2wav."))]
        bad = missing + [str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", [])]
        if bad:
            raise EsnError(f"{source}: {len(bad)} thinker weights are missing or of another shape "
                           f"(e.g. {', '.join(bad[:3])}): the weights do not match config.json")
        thinker = model.config.thinker_config
        for token, want in ((AUDIO_PAD, thinker.audio_token_id), (AUDIO_START, thinker.audio_start_token_id)):
            if tokenizer.convert_tokens_to_ids(token) != want:
                raise EsnError(f"{source}: the tokenizer maps {token} to "
                               f"{tokenizer.convert_tokens_to_ids(token)}, the model expects {want}")
        model.to(device).eval()
        return cls(model, tokenizer, features, max_new_tokens=max_new_tokens, batch_size=batch_size,
                   use_sources=use_sources)

    def judge(self, audios: Sequence[Audio], *, sources: Sequence[Audio] | None = None) -> list[Judgement]:
        """Label each audio; with ``sources`` (same length) each question also hears the source."""
        if sources is not None and len(sources) != len(audios):
            raise EsnError(f"lalm_judge: {len(audios)} audios but {len(sources)} sources")
        with_source = sources is not None and self.use_sources

        def wave(a: Audio, i: int, what: str):
            return prepare_audio(a.samples, a.sample_rate, target_rate=MODEL_RATE, name=a.name or f"{what} {i}")

        items = [([wave(sources[i], i, "source")] if with_source else []) + [wave(a, i, "audio")]
                 for i, a in enumerate(audios)]
        out: list[Judgement] = []
        for start in range(0, len(items), self.batch_size):
            for raw in self._ask(items[start : start + self.batch_size], with_source):
                label = parse_answer(raw)
                self.unparseable += label is None
                out.append(Judgement(label, {}, raw=raw))
        return out

    def _ask(self, items: list[list], with_source: bool) -> list[str]:
        """One greedy generate for a batch of questions; returns the decoded answers."""
        import torch
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
            _get_feat_extract_output_lengths,
        )

        flat = [w for item in items for w in item]
        feats = self.features(flat, sampling_rate=MODEL_RATE, padding="longest", truncation=False,
                              return_attention_mask=True, return_tensors="pt")
        mask = feats["attention_mask"]  # [n_audio, frames], 100 frames per second
        thinker = self.model.thinker
        n_tokens = _get_feat_extract_output_lengths(mask.sum(-1), thinker.config.audio_config.n_window).tolist()
        prompts, k = [], 0
        for item in items:
            prompts.append(chat_prompt(n_tokens[k : k + len(item)], with_source))
            k += len(item)
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True)
        device = thinker.device
        with torch.no_grad():
            generated = thinker.generate(
                input_ids=enc["input_ids"].to(device),
                attention_mask=enc["attention_mask"].to(device),
                input_features=feats["input_features"].to(device, thinker.dtype),
                feature_attention_mask=mask.to(device),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                eos_token_id=self.tokenizer.convert_tokens_to_ids(IM_END),
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new = generated[:, enc["input_ids"].shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    @classmethod
    def write_tiny(cls, directory: str | Path, seed: int = 0) -> Path:
        """Write a tiny random Qwen3-Omni-MoE checkpoint, tokenizer and feature extractor that ``load`` reads."""
        from esn_lalm_judge.tiny import write_tiny

        return write_tiny(Path(directory), seed=seed)
