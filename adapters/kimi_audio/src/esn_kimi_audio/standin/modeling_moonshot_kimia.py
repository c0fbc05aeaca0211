"""Tiny stand-in of Kimi-Audio's ``modeling_moonshot_kimia.py``: one decoder, two heads.

``model.layers`` run on ``embed(audio ids) + embed(text ids)`` (Whisper features added at continuous
positions); the hidden state after layer ``kimia_mimo_transformer_from_layer_index`` also feeds
``model.mimo_layers`` -> ``mimo_norm`` -> ``mimo_output`` (audio logits), while the last main layer feeds
``norm`` -> ``lm_head`` (text logits). Layers are transformers' own ``Qwen2DecoderLayer``.
``forward(..., return_dict=False)`` returns ``(audio_logits, text_logits, past_key_values)``.
"""

import math

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from .configuration_moonshot_kimia import KimiAudioConfig


class VQAdaptor(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(config.kimia_adaptor_input_dim, config.hidden_size, bias=True),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Linear(config.hidden_size, config.hidden_size, bias=True),
            nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps, bias=True),
        )

    def forward(self, x):
        return self.layers(x)


class MoonshotKimiaPreTrainedModel(PreTrainedModel):
    config_class = KimiAudioConfig
    base_model_prefix = "model"
    _no_split_modules = ["Qwen2DecoderLayer"]  # noqa: RUF012 (transformers reads a list)


def _run(layer, hidden, mask, position_ids, cache, position_embeddings):
    # positional cache argument: its keyword changed name across transformers releases
    out = layer(hidden, mask, position_ids, cache, use_cache=True, position_embeddings=position_embeddings)
    return out[0] if isinstance(out, tuple) else out


class MoonshotKimiaModel(MoonshotKimiaPreTrainedModel):
    def __init__(self, config: KimiAudioConfig):
        super().__init__(config)
        self.kimia_mimo_transformer_from_layer_index = config.kimia_mimo_transformer_from_layer_index
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([Qwen2DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # the MIMO layers keep their own cache, numbered from 0
        self.mimo_layers = nn.ModuleList([Qwen2DecoderLayer(config, i) for i in range(config.kimia_mimo_layers)])
        self.mimo_norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        if config.use_whisper_feature:
            self.vq_adaptor = VQAdaptor(config)
        self.post_init()

    def _embed(self, input_ids, text_input_ids, whisper_input_feature, is_continuous_mask):
        audio_emb = self.embed_tokens(input_ids)  # [1, pos, hidden]
        if self.config.use_whisper_feature and whisper_input_feature is not None:
            if not isinstance(whisper_input_feature, list):
                whisper_input_feature = [whisper_input_feature]
            starts = (input_ids[0] == self.config.kimia_media_begin).nonzero()[:, 0]
            ends = (input_ids[0] == self.config.kimia_media_end).nonzero()[:, 0]
            dim = whisper_input_feature[0].shape[-1]
            # in the features' own dtype (bf16 from kimia_infer), uncast, as published: vq_adaptor below
            # then fails unless the ALM is bf16 too
            expanded = torch.zeros(audio_emb.shape[1], dim, dtype=whisper_input_feature[0].dtype, device=audio_emb.device)
            for feature, start, end in zip(whisper_input_feature, starts.tolist(), ends.tolist(), strict=False):
                feature = feature.reshape(-1, dim)
                expanded[start + 1 : end] = feature[: end - start - 1]
            mask = is_continuous_mask.to(audio_emb.device)[:, :, None]
            whisper_emb = self.vq_adaptor(expanded[None]) * mask
            mixed = (audio_emb + whisper_emb) * math.sqrt(2.0)
            audio_emb = torch.where(mask, mixed, audio_emb)
        if text_input_ids is not None and text_input_ids.sum() != 0:
            return audio_emb + self.embed_tokens(text_input_ids)
        return audio_emb

    def forward(self, input_ids=None, text_input_ids=None, whisper_input_feature=None, is_continuous_mask=None,
                attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None, use_cache=True,
                output_attentions=None, output_hidden_states=None, return_dict=None):
        if inputs_embeds is None:
            inputs_embeds = self._embed(input_ids, text_input_ids, whisper_input_feature, is_continuous_mask)
        main_cache, mimo_cache = past_key_values if past_key_values is not None else (DynamicCache(), DynamicCache())
        past = main_cache.get_seq_length()
        length = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=inputs_embeds.device)[None]
        mask = None
        if length > 1:  # causal prefill; a single decode step attends to everything cached
            mask = torch.full((length, past + length), float("-inf"), device=inputs_embeds.device)
            mask = mask.triu(past + 1).to(inputs_embeds.dtype)[None, None]
        rope = self.rotary_emb(inputs_embeds, position_ids)
        hidden = inputs_embeds
        mimo_hidden = None
        for idx, layer in enumerate(self.layers):
            hidden = _run(layer, hidden, mask, position_ids, main_cache, rope)
            if idx == self.kimia_mimo_transformer_from_layer_index:
                mimo_hidden = hidden.clone()
        hidden = self.norm(hidden)
        for layer in self.mimo_layers:
            mimo_hidden = _run(layer, mimo_hidden, mask, position_ids, mimo_cache, rope)
        mimo_hidden = self.mimo_norm(mimo_hidden)
        return hidden, mimo_hidden, (main_cache, mimo_cache)


class MoonshotKimiaForCausalLM(MoonshotKimiaPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = MoonshotKimiaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mimo_output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids=None, text_input_ids=None, whisper_input_feature=None, is_continuous_mask=None,
                attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None, labels=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, generation_mode=None,
                return_dict=None):
        hidden, mimo_hidden, cache = self.model(
            input_ids=input_ids, text_input_ids=text_input_ids, whisper_input_feature=whisper_input_feature,
            is_continuous_mask=is_continuous_mask, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds,
        )
        text_logits = self.lm_head(hidden)  # [1, pos, vocab]
        audio_logits = self.mimo_output(mimo_hidden)  # [1, pos, vocab]
        return audio_logits, text_logits, cache
