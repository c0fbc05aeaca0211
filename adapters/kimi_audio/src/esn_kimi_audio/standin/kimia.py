"""Tiny stand-in of ``kimia_infer.api.kimia.KimiAudio`` (same constructor, ``generate`` and decode loop).

Imitated because the adapter depends on it: the ALM loads in bfloat16; the Whisper features come out
in bfloat16 and reach the ALM uncast (the published Whisper encoder runs in bf16); the prompt gets
``<|im_kimia_speech_ctd_id|>`` only after an audio message that ends the user turn; "both" mode allows
``1500 - prompt length`` steps (120 s at 12.5 tokens/s); zero speech tokens still go to the detokenizer,
which fails on them like the published vocoder does.

Differences from the real wrapper, all outside the ALM: the ALM stays on the device it loads on (CPU
here) instead of ``torch.cuda.current_device()``; the text tokenizer is character-level; speech
tokens and Whisper features are fixed log-spectrum functions of 80 ms frames (12.5 per second); the
detokenizer turns each speech token into 80 ms of tone plus a little seeded noise at 24 kHz.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SPECIALS = {
    "<|im_msg_end|>": "msg_end",
    "<|im_user_msg_start|>": "user_msg_start",
    "<|im_assistant_msg_start|>": "assistant_msg_start",
    "<|im_media_begin|>": "media_begin",
    "<|im_media_end|>": "media_end",
    "<|im_kimia_text_blank|>": "kimia_text_blank",
    "<|im_kimia_text_eos|>": "kimia_text_eos",
    "<|im_kimia_user_msg_start|>": "kimia_user_msg_start",
    "<|im_kimia_assistant_msg_start|>": "kimia_assistant_msg_start",
    "<|im_kimia_speech_ct_id|>": "kimia_speech_ct_id",
    "<|im_kimia_speech_ctd_id|>": "kimia_speech_ctd_id",
    "<pad>": "pad",
}
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
FRAME = 1280  # 80 ms of 16 kHz audio: one speech token, one Whisper feature row
VOCAB = list(SPECIALS) + CHARS  # text ids; speech ids start at kimia_token_offset


@dataclass
class ExtraTokens:
    msg_end: int
    user_msg_start: int
    assistant_msg_start: int
    media_begin: int
    media_end: int
    kimia_text_blank: int
    kimia_text_eos: int
    kimia_user_msg_start: int
    kimia_assistant_msg_start: int
    kimia_speech_ct_id: int
    kimia_speech_ctd_id: int
    pad: int


class TinyTextTokenizer:
    def __init__(self):
        self.special_tokens = {tok: i for i, tok in enumerate(VOCAB[: len(SPECIALS)])}
        self.pad_id = self.special_tokens["<pad>"]
        self._ids = {ch: i for i, ch in enumerate(VOCAB)}

    def encode(self, text, bos=False, eos=False):
        return [self._ids[ch] for ch in text if ch in self._ids]

    def decode(self, ids):
        return "".join(VOCAB[i] for i in ids if len(SPECIALS) <= i < len(VOCAB))


def _frames(wav: np.ndarray, bins: int) -> torch.Tensor:
    """``[frames, bins]`` log-spectrum of 80 ms frames."""
    x = torch.as_tensor(np.asarray(wav, dtype=np.float32))
    n = max(1, x.numel() // FRAME)
    x = F.pad(x, (0, max(0, n * FRAME - x.numel())))[: n * FRAME].reshape(n, FRAME)
    spec = torch.fft.rfft(x, dim=-1).abs()
    return torch.log(F.adaptive_avg_pool1d(spec[:, None, :], bins)[:, 0] + 1e-5)


def _load_wav(path: str) -> np.ndarray:
    import soundfile as sf
    from esn.audio import resample

    data, rate = sf.read(path, dtype="float32", always_2d=True)
    return resample(data.mean(axis=1), rate, 16000)


class KimiAPromptManager:
    """Builds the parallel audio / text id streams of a conversation, like the real prompt manager."""

    def __init__(self, config):
        self.text_tokenizer = TinyTextTokenizer()
        ids = self.text_tokenizer.special_tokens
        self.extra_tokens = ExtraTokens(**{name: ids[tok] for tok, name in SPECIALS.items()})
        self.offset = config.kimia_token_offset
        self.audio_vocab = config.vocab_size - config.kimia_token_offset
        self.feature_dim = config.kimia_adaptor_input_dim

    def get_prompt(self, messages, output_type="text"):
        assert output_type in ["text", "both"]
        x = self.extra_tokens
        audio, text, cont, features = [], [], [], []

        def put(a, t, c=False):
            audio.append(a)
            text.append(t)
            cont.append(c)

        previous = None
        for i, msg in enumerate(messages):
            assert msg["role"] in ["user", "assistant"]
            last_of_turn = i == len(messages) - 1 or messages[i + 1]["role"] != msg["role"]
            if msg["role"] != previous:
                put(x.kimia_user_msg_start if msg["role"] == "user" else x.kimia_assistant_msg_start,
                    x.kimia_text_blank)
            previous = msg["role"]
            if msg["message_type"] == "text":
                for t in self.text_tokenizer.encode(msg["content"]):
                    put(x.kimia_text_blank, t)
            elif msg["message_type"] == "audio":
                wav = _load_wav(msg["content"])
                spec = _frames(wav, self.feature_dim)
                speech = (spec.argmax(-1) % self.audio_vocab + self.offset).tolist()
                put(x.media_begin, x.kimia_text_blank)
                for s in speech:
                    put(s, x.kimia_text_blank, True)
                put(x.media_end, x.kimia_text_blank)
                features.append(spec[None].to(torch.bfloat16))  # [1, frames, adaptor_in]: the encoder's bf16
                if last_of_turn:
                    put(x.kimia_speech_ct_id if output_type == "text" else x.kimia_speech_ctd_id, x.kimia_text_blank)
            else:
                raise NotImplementedError(f"message_type: {msg['message_type']}")
            if last_of_turn:
                put(x.msg_end, x.kimia_text_blank)
        put(x.kimia_assistant_msg_start, x.kimia_text_blank)
        return (torch.tensor([audio]), torch.tensor([text]), torch.tensor([cont]), features)


class TinyDetokenizer:
    """Speech tokens (12.5 per second) -> 24 kHz waveform; seeded noise plays the flow-matching start.

    Like the published detokenizer it works chunk by chunk, 4 mel frames of 480 samples per token, and
    fails on an empty chunk: the vocoder's first convolution (kernel 7, padding 3) needs at least one frame.
    """

    frame = 480

    def clear_states(self):
        pass

    def detokenize_streaming(self, semantic_token, is_final=False, upsample_factor=1):
        assert semantic_token.dim() == 2 and semantic_token.shape[0] == 1
        frames = semantic_token.repeat_interleave(upsample_factor, dim=1).reshape(-1).float().cpu()  # [4n]
        if frames.numel() == 0:
            raise RuntimeError("Calculated padded input size per channel: (6). Kernel size: (7). "
                               "Kernel size can't be greater than actual input size")
        t = torch.arange(self.frame, dtype=torch.float32) / 24000
        wave = 0.1 * torch.sin(2 * math.pi * (120.0 + 12.0 * frames[:, None]) * t[None, :]).reshape(-1)
        return (wave + 1e-3 * torch.randn(wave.shape))[None]  # [1, N]


class KimiASampler:
    def __init__(self, audio_top_k, audio_temperature, audio_repetition_penalty, audio_repetition_window_size,
                 text_top_k, text_temperature, text_repetition_penalty, text_repetition_window_size):
        self.audio = (audio_top_k, audio_temperature, audio_repetition_penalty, audio_repetition_window_size)
        self.text = (text_top_k, text_temperature, text_repetition_penalty, text_repetition_window_size)

    @staticmethod
    def _sample(logits, recent, top_k, temperature, penalty, window):
        logits = logits[:, -1].float() if logits.dim() == 3 else logits.float()  # [1, vocab]
        if penalty > 1.0 and recent is not None and len(recent) > window:
            idx = recent[-window:].long()[None]
            score = logits.gather(1, idx)
            logits = logits.scatter(1, idx, torch.where(score < 0, score * penalty, score / penalty))
        logprobs = torch.log_softmax(logits, -1)
        if temperature <= 1e-6:  # greedy
            return logprobs.argmax(-1)
        logprobs = logprobs / temperature
        if top_k > 0:
            top, index = torch.topk(logprobs.exp(), top_k, -1)
            return index.gather(-1, torch.multinomial(top / top.sum(-1, keepdim=True), 1))[:, 0]
        return torch.multinomial(logprobs.softmax(-1), 1)[:, 0]

    def sample_text_logits(self, logits, recent_tokens=None):
        return self._sample(logits, recent_tokens, *self.text)

    def sample_audio_logits(self, logits, recent_tokens=None):
        return self._sample(logits, recent_tokens, *self.audio)


class KimiAudio:
    def __init__(self, model_path: str, load_detokenizer: bool = True):
        from transformers import AutoModelForCausalLM

        if not os.path.exists(model_path):
            raise FileNotFoundError(f"{model_path}: the stand-in loads local directories only")
        self.alm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16, trust_remote_code=True)
        self.alm.eval()
        self.kimia_token_offset = self.alm.config.kimia_token_offset
        self.prompt_manager = KimiAPromptManager(self.alm.config)
        self.detokenizer = TinyDetokenizer() if load_detokenizer else None
        self.extra_tokens = self.prompt_manager.extra_tokens
        self.kimia_text_audiodelaytokens = 6
        self.eod_ids = [self.extra_tokens.msg_end, self.extra_tokens.media_end]

    @torch.inference_mode()
    def _generate_loop(self, audio_input_ids, text_input_ids=None, max_new_tokens=50, audio_top_k=5,
                       audio_temperature=0.0, audio_repetition_penalty=1.0, audio_repetition_window_size=64,
                       text_top_k=5, text_temperature=0.0, text_repetition_penalty=1.0,
                       text_repetition_window_size=16, is_continuous_mask=None, continous_feature=None,
                       output_type="text"):
        sampler = KimiASampler(audio_top_k, audio_temperature, audio_repetition_penalty,
                               audio_repetition_window_size, text_top_k, text_temperature,
                               text_repetition_penalty, text_repetition_window_size)
        x, delay = self.extra_tokens, self.kimia_text_audiodelaytokens
        device = audio_input_ids.device
        audio_out = torch.zeros(max(max_new_tokens, 1), dtype=torch.long, device=device)
        text_out = torch.zeros(max(max_new_tokens, 1), dtype=torch.long, device=device)
        audio_ids, text_ids = audio_input_ids, text_input_ids
        position_ids = torch.arange(audio_ids.shape[1], device=device)[None]
        features, mask, past = continous_feature, is_continuous_mask, None
        text_done, n_text, n_audio = False, 0, 0
        for i in range(max_new_tokens):
            audio_logits, text_logits, past = self.alm.forward(
                input_ids=audio_ids, text_input_ids=text_ids, whisper_input_feature=features,
                is_continuous_mask=mask, position_ids=position_ids, past_key_values=past, return_dict=False,
            )
            next_text = sampler.sample_text_logits(text_logits, text_out[:i] if i else None)
            next_audio = sampler.sample_audio_logits(audio_logits, audio_out[:i] if i else None)
            if text_done:
                next_text.fill_(x.kimia_text_blank)
            elif int(next_text) == x.kimia_text_eos:
                text_done = True
            else:
                n_text += 1
            text_out[i] = next_text
            if i < delay or output_type == "text":
                next_audio.fill_(x.kimia_text_blank)
            else:
                n_audio += 1
            audio_out[i] = next_audio
            if (output_type == "text" and text_done) or (output_type == "both" and int(next_audio) in self.eod_ids):
                break
            audio_ids, text_ids = next_audio[None], next_text[None]
            position_ids = position_ids[:, -1:] + 1
            features, mask = None, None
        return audio_out[delay : delay + n_audio].tolist(), text_out[:n_text].tolist()

    @torch.inference_mode()
    def generate(self, chats, output_type="text", audio_temperature=0.0, audio_top_k=5, text_temperature=0.0,
                 text_top_k=5, audio_repetition_penalty=1.0, audio_repetition_window_size=64,
                 text_repetition_penalty=1.0, text_repetition_window_size=16, max_new_tokens=-1):
        assert output_type in ["text", "both"]
        audio_ids, text_ids, mask, features = self.prompt_manager.get_prompt(chats, output_type=output_type)
        if output_type == "both":
            max_new_tokens = int(12.5 * 120) - audio_ids.shape[1]
        elif max_new_tokens == -1:
            max_new_tokens = 7500 - audio_ids.shape[1]
        device = self.alm.device
        features = [f.to(device) for f in features]  # moved, not cast: they stay bf16
        wav_tokens, text_tokens = self._generate_loop(
            audio_ids.to(device), text_ids.to(device), max_new_tokens=max_new_tokens,
            audio_temperature=audio_temperature, audio_top_k=audio_top_k,
            audio_repetition_penalty=audio_repetition_penalty,
            audio_repetition_window_size=audio_repetition_window_size, text_top_k=text_top_k,
            text_temperature=text_temperature, text_repetition_penalty=text_repetition_penalty,
            text_repetition_window_size=text_repetition_window_size, is_continuous_mask=mask.to(device),
            continous_feature=features, output_type=output_type,
        )
        wav_tokens = torch.tensor([t for t in wav_tokens if t >= self.kimia_token_offset])[None]  # float if empty
        wav_tokens = wav_tokens - self.kimia_token_offset
        text = self.detokenize_text([t for t in text_tokens if t < self.kimia_token_offset])
        wav = None
        if self.detokenizer is not None and output_type == "both":
            wav = self.detokenize_audio(wav_tokens)
        return wav, text

    def detokenize_audio(self, audio_tokens):
        """In chunks of 30 tokens, the first chunk even when there are no tokens at all."""
        if self.detokenizer is None:
            raise ValueError("Detokenizer is not initialized")
        self.detokenizer.clear_states()
        audio_tokens = audio_tokens.long()
        n = audio_tokens.size(1)
        chunks = [self.detokenizer.detokenize_streaming(audio_tokens[:, :30], is_final=n <= 30, upsample_factor=4)]
        for i in range(30, n, 30):
            chunks.append(self.detokenizer.detokenize_streaming(audio_tokens[:, i : i + 30], is_final=i + 30 >= n,
                                                                upsample_factor=4))
        return torch.cat(chunks, dim=-1)

    def detokenize_text(self, text_tokens):
        out = []
        for t in text_tokens:
            if t == self.extra_tokens.kimia_text_eos:
                break
            out.append(t)
        return self.prompt_manager.text_tokenizer.decode(out)
