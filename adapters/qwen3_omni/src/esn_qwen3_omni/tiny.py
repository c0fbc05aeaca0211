"""A tiny random Qwen3-Omni checkpoint: the real ``Qwen3OmniMoeForConditionalGeneration`` at tiny sizes.

Thinker: 3 decoder layers, layers 0 and 2 mixture-of-experts (8 experts, top 2, 16 units each), layer 1
dense (``mlp_only_layers``), so both kinds of ``lm`` hook point exist. Talker: 2 MoE layers (6 experts,
top 2, 8 units, plus a 16-unit shared expert) and a 2-layer code predictor; 4 code groups; a one-layer
code2wav. Written with ``save_pretrained`` plus a byte-level tokenizer with Qwen3-Omni's special tokens
and a 128-bin ``WhisperFeatureExtractor``.

Pitfalls handled here (transformers 5.24):

* the talker's MoE blocks are not covered by ``_init_weights`` (its experts stay ``torch.empty``, its
  router weight zeros): they are initialised here, and every parameter is checked finite before saving;
* the talker suppresses ids ``vocab - 1024 .. vocab - 1`` except codec eos while it generates, so its
  vocabulary is the codebook plus 1024 special ids, as in the released model (2048 + 1024);
* normal(0, 0.02) weights through code2wav's dozens of convolutions give ~1e-8 audio, which esn's judges
  refuse as silence: its convolutions get PyTorch's default (fan-in scaled) init, peak ~0.1;
* the talker config needs ``spatial_merge_size`` (read in ``__init__``, not a declared field);
* role tokens: ``generate`` recognises the user turn by the id right after ``<|im_start|>``; with a
  byte tokenizer that is the first byte of the role name (``u``, ``s``, ``a``).
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_start|>", "<|audio_end|>",
            "<|audio_pad|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>",
            "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>")
TEXT_VOCAB = 320  # 256 byte tokens + the specials + room
CODEBOOK = 16  # codes per code group
CODE_GROUPS = 4
SPEAKERS = ("chelsie", "ethan", "aiden")


def _id(token: str) -> int:
    return 256 + SPECIALS.index(token)


def role_id(role: str) -> int:
    """The id ``generate`` sees right after ``<|im_start|>`` for a role: its first byte's token."""
    return tiny_tokenizer()(role, add_special_tokens=False)["input_ids"][0]


def tiny_config(experts_implementation: str | None = None):
    """A ``Qwen3OmniMoeConfig`` at tiny sizes (MoE and dense thinker layers, talker experts with a shared
    expert, a code predictor, a one-layer code2wav) with the tiny tokenizer's special-token ids."""
    from transformers import Qwen3OmniMoeConfig

    hidden, talker_hidden = 32, 24
    text = {
        "vocab_size": TEXT_VOCAB, "hidden_size": hidden, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "moe_intermediate_size": 16, "num_experts": 8,
        "num_experts_per_tok": 2, "mlp_only_layers": [1], "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 1, 1],
                            "interleaved": True, "mrope_interleaved": True},
        "pad_token_id": _id("<|endoftext|>"), "eos_token_id": _id("<|im_end|>"),
    }
    audio = {"num_mel_bins": 128, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 32,
             "d_model": 16, "output_dim": hidden, "downsample_hidden_size": 8, "max_source_positions": 1500}
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": hidden,
              "deepstack_visual_indexes": [0]}
    media = {"audio_token_id": _id("<|audio_pad|>"), "image_token_id": _id("<|image_pad|>"),
             "video_token_id": _id("<|video_pad|>"), "vision_start_token_id": _id("<|vision_start|>"),
             "audio_start_token_id": _id("<|audio_start|>")}
    thinker = {"text_config": text, "audio_config": audio, "vision_config": vision, "user_token_id": role_id("user"),
               "position_id_per_seconds": 13, **media}
    c = CODEBOOK
    talker = {
        "text_config": {
            "vocab_size": c + 1024, "hidden_size": talker_hidden, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 12, "moe_intermediate_size": 8,
            "shared_expert_intermediate_size": 16, "num_experts": 6, "num_experts_per_tok": 2,
            "norm_topk_prob": True, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 2, 2],
                                "interleaved": True},
        },
        "code_predictor_config": {
            "vocab_size": c, "hidden_size": talker_hidden, "intermediate_size": 40, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 12, "num_code_groups": CODE_GROUPS,
            "max_position_embeddings": 64,
        },
        "num_code_groups": CODE_GROUPS, "thinker_hidden_size": hidden, "accept_hidden_layer": 2,
        "codec_pad_id": c, "codec_bos_id": c + 1, "codec_eos_token_id": c + 2, "codec_nothink_id": c + 3,
        "codec_think_bos_id": c + 4, "codec_think_eos_id": c + 5,
        "speaker_id": {name: c + 6 + i for i, name in enumerate(SPEAKERS)},
        "position_id_per_seconds": 13, "spatial_merge_size": 2, **media,
    }
    code2wav = {
        "codebook_size": c, "hidden_size": 16, "max_position_embeddings": 1024, "num_attention_heads": 2,
        "num_key_value_heads": 2, "sliding_window": 8, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_quantizers": CODE_GROUPS, "upsample_rates": [8, 5, 4, 3], "upsampling_ratios": [2, 2],
        "decoder_dim": 32,
    }
    config = Qwen3OmniMoeConfig(
        thinker_config=thinker, talker_config=talker, code2wav_config=code2wav, enable_audio_output=True,
        im_start_token_id=_id("<|im_start|>"), im_end_token_id=_id("<|im_end|>"),
        tts_pad_token_id=_id("<tts_pad>"), tts_bos_token_id=_id("<tts_text_bos>"),
        tts_eos_token_id=_id("<tts_text_eod>"),
        system_token_id=role_id("system"), user_token_id=role_id("user"), assistant_token_id=role_id("assistant"),
    )
    config.architectures = ["Qwen3OmniMoeForConditionalGeneration"]
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    return config


def tiny_tokenizer():
    """A byte-level BPE tokenizer (one token per byte) with Qwen3-Omni's special tokens at 256..."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   padding_side="left")


def initialise_talker_experts(model, *, seed: int) -> int:
    """Give the talker's routed experts and routers random values (transformers 5.24 leaves them unset).

    ``_init_weights`` initialises ``Qwen3OmniMoeThinkerTextSparseMoeBlock`` only; the talker's
    ``Qwen3OmniMoeTalkerTextSparseMoeBlock`` keeps ``torch.empty`` experts and an all-zero router (every
    expert tied, so top-k always picks the first ones). Normal(0, initializer_range) like the thinker's.
    Returns the number of tensors set.
    """
    import torch

    std = model.config.talker_config.initializer_range
    generators: dict = {}  # one per device, seeded: drawn where the weights live (GPU-sized models)
    n = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("talker.model.layers.") and (
                name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"))
            ):
                if param.device not in generators:
                    generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
                param.normal_(0.0, std, generator=generators[param.device])
                n += 1
    return n


def audible_code2wav(model, *, seed: int) -> int:
    """Re-initialise code2wav's convolutions with PyTorch's default init (see the module docstring)."""
    import torch

    torch.manual_seed(seed)
    convs = [m for m in model.code2wav.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d))]
    for conv in convs:
        conv.reset_parameters()
    return len(convs)


def write_tiny(directory: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny random checkpoint (every parameter initialised and checked finite), its tokenizer
    and feature extractor to ``directory``; returns it."""
    import torch
    from transformers import Qwen3OmniMoeForConditionalGeneration, WhisperFeatureExtractor
    from transformers.utils import logging as hf_logging

    from esn_qwen3_omni.checks import check_finite

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # tiny vocabularies and mrope keys trip transformers' config warnings
    try:
        torch.manual_seed(seed)
        model = Qwen3OmniMoeForConditionalGeneration(tiny_config()).eval()
        initialise_talker_experts(model, seed=seed + 1)
        audible_code2wav(model, seed=seed + 2)
        check_finite(model, str(directory))
        model.save_pretrained(directory)
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = tiny_tokenizer()
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIALS] == [_id(t) for t in SPECIALS]
    tokenizer.save_pretrained(directory)
    WhisperFeatureExtractor(feature_size=128, sampling_rate=16_000).save_pretrained(directory)
    return directory
