"""A tiny random Qwen3-Omni-MoE checkpoint for tests and the demo, built and saved offline.

The real ``Qwen3OmniMoeForConditionalGeneration`` class at tiny sizes (thinker only: the judge never
builds the talker), a byte-level BPE tokenizer with Qwen's special tokens (no merges), and a
128-bin ``WhisperFeatureExtractor``. Pitfalls handled: every special id lies inside the tiny
vocabulary, ``mrope_section`` sums to head_dim / 2, the audio encoder's output size equals the
text hidden size, and deepstack indexes exist in the one-layer vision tower.
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_start|>", "<|audio_end|>",
            "<|audio_pad|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
VOCAB = 320  # 256 byte tokens + the specials + room


def tiny_config():
    """A ``Qwen3OmniMoeConfig`` with a tiny thinker (2 layers, 4 experts) and tiny audio/vision encoders."""
    from transformers import Qwen3OmniMoeConfig

    ids = {tok: 256 + i for i, tok in enumerate(SPECIALS)}
    hidden, heads = 32, 4  # head_dim 8 -> mrope_section sums to 4
    text = {
        "vocab_size": VOCAB, "hidden_size": hidden, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": heads, "num_key_value_heads": 2, "moe_intermediate_size": 16,
        "num_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 1, 1],
                            "interleaved": True, "mrope_interleaved": True},
        "pad_token_id": ids["<|endoftext|>"], "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
    }
    audio = {"num_mel_bins": 128, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 32,
             "d_model": 16, "output_dim": hidden, "downsample_hidden_size": 8, "max_source_positions": 1500}
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": hidden,
              "deepstack_visual_indexes": [0]}
    thinker = {
        "text_config": text, "audio_config": audio, "vision_config": vision,
        "audio_token_id": ids["<|audio_pad|>"], "audio_start_token_id": ids["<|audio_start|>"],
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "user_token_id": 117,  # byte token "u"
    }
    return Qwen3OmniMoeConfig(
        thinker_config=thinker, enable_audio_output=False,
        im_start_token_id=ids["<|im_start|>"], im_end_token_id=ids["<|im_end|>"],
        system_token_id=115, user_token_id=117, assistant_token_id=97,
    )


def tiny_tokenizer():
    """A byte-level BPE tokenizer (one token per byte) with Qwen3-Omni's special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])  # ids 256...
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   additional_special_tokens=list(SPECIALS[1:]), padding_side="left")


def write_tiny(directory: Path, *, seed: int = 0) -> Path:
    """Write a tiny random Qwen3-Omni-MoE checkpoint, tokenizer and feature extractor that ``LalmJudge.load`` reads."""
    import torch
    from transformers import Qwen3OmniMoeForConditionalGeneration, WhisperFeatureExtractor

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(tiny_config()).eval()
    model.save_pretrained(directory)
    tokenizer = tiny_tokenizer()
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIALS] == list(range(256, 256 + len(SPECIALS)))
    tokenizer.save_pretrained(directory)
    WhisperFeatureExtractor(feature_size=128, sampling_rate=16_000).save_pretrained(directory)
    return directory
