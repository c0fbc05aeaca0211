"""A tiny random Qwen2.5-Omni checkpoint: the real classes with a tiny config (~0.3M parameters).

Written with ``save_pretrained`` plus everything ``QwenOmniAdapter.load`` reads: a byte-level tokenizer
with the Qwen chat/audio special tokens (``tokenizer.json`` + ``tokenizer_config.json``) and the speaker
conditioning as ``speakers.safetensors``. Pitfalls handled here: every special id fits the tiny
vocabularies; ``mrope_section`` sums to ``head_dim / 2``; DiT ``num_embeds`` covers the codec vocabulary;
BigVGAN channels stay >= 1 through six upsampling stages.
"""

from __future__ import annotations

from pathlib import Path

# Thinker vocabulary: 256 byte tokens, then the special tokens below, padded to TEXT_VOCAB.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|IMAGE|>", "<|VIDEO|>", "<|vision_bos|>", "<|vision_eos|>",
    "<|tts_text_bos|>", "<|tts_text_eod|>", "<|tts_text_pad|>", "<|spk_chelsie|>", "<|spk_ethan|>",
)
TEXT_VOCAB = 272
CODEC_VOCAB = 64  # codes 0..59, then pad, bos, eos, mask
SPEAKERS = ("Chelsie", "Ethan")


def _special(name: str) -> int:
    return 256 + SPECIAL_TOKENS.index(name)


def tiny_tokenizer():
    """A byte-level BPE tokenizer without merges: any text encodes, specials are single ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left"
    )


def token_ids() -> tuple[dict, dict]:
    """Special ids of the tiny tokenizer: (ids shared by thinker and talker configs, talker-only ids)."""
    shared = {
        "audio_token_index": _special("<|AUDIO|>"),
        "image_token_index": _special("<|IMAGE|>"),
        "video_token_index": _special("<|VIDEO|>"),
        "audio_start_token_id": _special("<|audio_bos|>"),
        "audio_end_token_id": _special("<|audio_eos|>"),
        "vision_start_token_id": _special("<|vision_bos|>"),
        "vision_end_token_id": _special("<|vision_eos|>"),
        "user_token_id": 0,
    }
    talker = {
        "tts_codec_pad_token_id": 60, "tts_codec_start_token_id": 61, "tts_codec_end_token_id": 62,
        "tts_codec_mask_token_id": 63,
        "tts_text_start_token_id": _special("<|tts_text_bos|>"),
        "tts_text_end_token_id": _special("<|tts_text_eod|>"),
        "tts_text_pad_token_id": _special("<|tts_text_pad|>"),
    }
    return shared, talker


def speaker_bos(name: str) -> int:
    """The tiny tokenizer's ``<|spk_<name>|>`` id that opens a speaker's talker stream."""
    return _special(f"<|spk_{name.lower()}|>")


def tiny_config():
    """A ``Qwen2_5OmniConfig`` of ~0.3M parameters whose special ids fit the tiny vocabularies."""
    from transformers import Qwen2_5OmniConfig

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # head_dim 16
    ids, talker_ids = token_ids()
    thinker = {
        "audio_config": {
            "num_mel_bins": 128, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 32,
            "d_model": 16, "output_dim": 32, "max_source_positions": 1500, "n_window": 100,
        },
        "vision_config": {
            "depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32,
            "fullatt_block_indexes": [0],
        },
        "text_config": {
            "vocab_size": TEXT_VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "rope_parameters": rope,
            "max_position_embeddings": 4096, "eos_token_id": _special("<|im_end|>"),
            "pad_token_id": _special("<|endoftext|>"),
        },
        **ids,
    }
    talker = {
        "vocab_size": CODEC_VOCAB,
        **talker_ids,
        "embedding_size": 32, "hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "rope_parameters": rope,
        "max_position_embeddings": 4096,
        **ids,
    }
    token2wav = {
        "dit_config": {
            "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 16, "ff_mult": 2,
            "emb_dim": 16, "num_embeds": CODEC_VOCAB, "mel_dim": 80, "enc_emb_dim": 16, "enc_dim": 16,
            "enc_channels": [16, 16, 16, 16, 48], "enc_attention_channels": 8, "enc_se_channels": 8,
            "look_ahead_layers": [1], "look_backward_layers": [0],
        },
        "bigvgan_config": {
            "mel_dim": 80, "upsample_initial_channel": 64, "resblock_kernel_sizes": [3],
            "resblock_dilation_sizes": [[1, 3, 5]],
        },
    }
    config = Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker, token2wav_config=token2wav)
    config.architectures = ["Qwen2_5OmniForConditionalGeneration"]
    return config


def write_tiny(directory: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny random checkpoint (weights, tokenizer, ``speakers.safetensors``) that ``QwenOmniAdapter.load`` reads."""
    import torch
    from transformers import Qwen2_5OmniForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from esn_qwen_omni.speakers import SAFETENSORS_NAME, save_speakers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # tiny vocabularies trip transformers' special-id range warnings
    try:
        config = tiny_config()
        torch.manual_seed(seed)
        model = Qwen2_5OmniForConditionalGeneration(config).eval()
        model.save_pretrained(directory)
    finally:
        hf_logging.set_verbosity(verbosity)
    tiny_tokenizer().save_pretrained(directory)
    gen = torch.Generator().manual_seed(seed + 1)
    dit = config.token2wav_config.dit_config
    speakers = {
        name: {
            "bos_token": speaker_bos(name),
            "cond": torch.randn(1, dit.enc_emb_dim, generator=gen),
            "ref_mel": torch.randn(1, 30, dit.mel_dim, generator=gen),
        }
        for name in SPEAKERS
    }
    save_speakers(directory / SAFETENSORS_NAME, speakers)
    return directory
