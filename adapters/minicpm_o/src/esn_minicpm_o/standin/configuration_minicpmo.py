"""Tiny stand-in of MiniCPM-o 4.5's ``configuration_minicpmo.py`` (the fields the adapter and chat use).

The defaults are the published code's own (``condition_type="llm_hidden"``, ``audio_tokenizer_type=
"wavtokenizer"``), so only a checkpoint's config.json makes the TTS usable; ``s3_stream_generate`` and the
other ``s3_stream_*`` fields are not parameters at all: they exist only when config.json has them.
"""

from transformers import PretrainedConfig, Qwen3Config


class MiniCPMTTSConfig(PretrainedConfig):
    model_type = "minicpmtts"

    def __init__(
        self,
        llm_dim: int = 2560,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_attention_heads: int = 12,
        num_hidden_layers: int = 20,
        num_key_value_heads: int = 12,
        max_position_embeddings: int = 4096,
        num_audio_tokens: int = 4097,
        num_text_tokens: int = 21178,
        num_vq: int = 1,
        audio_bos_token_id: int = 21132,
        text_eos_token_id: int = 21133,
        projector_type: str = "default",
        normalize_projected_hidden: bool = False,
        condition_type: str = "llm_hidden",
        backbone_model: str = "llama",
        audio_tokenizer_type: str = "wavtokenizer",
        audio_tokenizer_sample_rate: int = 24000,
        attn_implementation: str = "sdpa",
        **kwargs,
    ):
        self.llm_dim = llm_dim
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_attention_heads = num_attention_heads
        self.num_hidden_layers = num_hidden_layers
        self.num_key_value_heads = num_key_value_heads
        self.max_position_embeddings = max_position_embeddings
        self.num_audio_tokens = num_audio_tokens
        self.num_text_tokens = num_text_tokens
        self.num_vq = num_vq
        self.audio_bos_token_id = audio_bos_token_id
        self.text_eos_token_id = text_eos_token_id
        self.projector_type = projector_type
        self.normalize_projected_hidden = normalize_projected_hidden
        self.condition_type = condition_type
        self.backbone_model = backbone_model
        self.audio_tokenizer_type = audio_tokenizer_type
        self.audio_tokenizer_sample_rate = audio_tokenizer_sample_rate
        self.attn_implementation = attn_implementation
        super().__init__(**kwargs)


class MiniCPMOConfig(Qwen3Config):
    model_type = "minicpmo"
    keys_to_ignore_at_inference = ["past_key_values"]  # noqa: RUF012 (transformers reads a list)

    def __init__(
        self,
        tts_config=None,
        init_vision: bool = False,
        init_audio: bool = True,
        init_tts: bool = True,
        audio_frame_samples: int = 640,  # stand-in audio encoder: 25 frames per second of 16 kHz audio
        audio_feature_bins: int = 16,
        standin_cache_length_from: str = "seen_tokens",
        **kwargs,
    ):
        if tts_config is None:
            tts_config = MiniCPMTTSConfig()
        elif isinstance(tts_config, dict):
            tts_config = MiniCPMTTSConfig(**tts_config)
        self.tts_config = tts_config
        self.init_vision = init_vision
        self.init_audio = init_audio
        self.init_tts = init_tts
        self.audio_frame_samples = audio_frame_samples
        self.audio_feature_bins = audio_feature_bins
        # How the patched prepare_inputs_for_generation reads the cache length: "seen_tokens" as the published
        # code does (that attribute is gone in transformers >= 4.54), or "get_seq_length" (its successor), which
        # the tiny checkpoint uses so that the stand-in runs on the transformers of the test machine.
        self.standin_cache_length_from = standin_cache_length_from
        super().__init__(**kwargs)

    def to_dict(self):
        out = super().to_dict()
        if isinstance(self.tts_config, PretrainedConfig):
            out["tts_config"] = self.tts_config.to_dict()
        return out
