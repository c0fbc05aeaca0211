"""Tiny stand-in of MiniCPM-o 4.5's ``modeling_minicpmo.py`` (remote code, loaded with trust_remote_code).

Same module tree, config fields and ``init_tts`` / ``chat`` signature as the published model; the
vision tower, Whisper encoder, processor and CosyVoice2 are replaced by small deterministic parts:

- ``llm``: a real ``Qwen3ForCausalLM``; text comes from its ``generate`` (greedy with ``do_sample=False,
  num_beams=1``; chat's own default is 3-beam search, as in the real code).
- audio input: 16 kHz waveform -> 25 frames/s of log-spectrum features -> ``audio_projection_layer``,
  placed at the ``<unk>`` positions between ``<|audio_start|>`` and ``<|audio_end|>``.
- ``tts``: ``emb_text(tokens) + projector_semantic(llm hidden states)`` between ``<|tts_bos|>`` and
  ``<|tts_eos|>``, then a real ``LlamaModel`` decodes audio tokens by ``torch.multinomial`` (temperature,
  top-k, top-p; no warpers at step 0; eos masked for ``min_new_token`` steps) — the TTS always samples.
- ``tts.audio_tokenizer``: a token -> 24 kHz waveform synthesiser (``TinyCosyVoice2``) set by ``init_tts()``
  from ``model_dir`` or, as published, from ``config._name_or_path + "/assets/CosyVoice2-0.5B"`` (which
  exists only when the model was loaded from a local directory); a plain attribute, not an ``nn.Module``.
- the speech path follows the checkpoint's ``tts_config`` switches as the published code does: only
  ``condition_type == "hidden_text_merge"`` makes speech (anything else raises NotImplementedError), and
  ``s3_stream_generate`` is read on every conversion (missing -> AttributeError; true -> the vocoder's
  ``inference_token2wav``, which the published CosyVoice2 does not have; false -> ``token2wav``).
- ``llm.prepare_inputs_for_generation`` is patched like the published code and reads the cache length
  through ``past_key_values.seen_tokens`` (gone in transformers >= 4.54) unless the config's
  ``standin_cache_length_from`` says ``"get_seq_length"`` (what the tiny checkpoint uses).
- ``chat`` writes audio to ``output_audio_path`` with soundfile at 24 kHz and swallows TTS errors
  (prints the traceback), as the real code does.

One stand-in difference: when the text ends without ``<|tts_eos|>`` the real code slices one more token
than it has hidden states and its (swallowed) TTS step fails; with random weights that would happen
every time, so this stand-in aligns the two lengths instead.
"""

import inspect
import json
import os
import re
import traceback
import types
from copy import deepcopy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaModel, PreTrainedModel, Qwen3ForCausalLM
from transformers.cache_utils import Cache
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from .configuration_minicpmo import MiniCPMOConfig, MiniCPMTTSConfig

# transformers 5 renamed the decoder's cache argument; use whichever this version takes
_CACHE_KW = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"

SPECIALS = [
    "<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|tts_bos|>", "<|tts_eos|>",
    "<think>", "</think>", "<|audio_start|>", "<|audio_end|>",
]
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")


class TinyTokenizer:
    """Character-level tokenizer: special tokens first, then printable ASCII and newline."""

    def __init__(self, vocab_size: int):
        chars = [chr(c) for c in range(32, 127)] + ["\n"]
        self.itos = (SPECIALS + chars)[:vocab_size]
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.bos_id = None

    def convert_tokens_to_ids(self, token):
        return self.stoi[token]

    def encode(self, text):
        ids = []
        for part in _SPECIAL_RE.split(text):
            if part in self.stoi and part in SPECIALS:
                ids.append(self.stoi[part])
            else:
                ids.extend(self.stoi.get(ch, self.stoi["<unk>"]) for ch in part)
        return ids

    def decode(self, ids):
        return "".join(self.itos[int(i)] for i in ids if 0 <= int(i) < len(self.itos))

    def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=True, use_tts_template=False,
                            enable_thinking=False, think_str="<think>\n\n</think>\n\n"):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
            if not enable_thinking:
                text += think_str
            if use_tts_template:
                text += "<|tts_bos|>"
        return text


@dataclass
class TTSSamplingParams:
    top_p: float = 0.85
    min_p: float = 0.01
    top_k: int = 25
    repetition_penalty: float = 1.05
    temperature: float = 0.8
    win_size: int = 16
    tau_r: float = 0.1


class TinyCosyVoice2:
    """Stands in for CosyVoice2 (``cosyvoice.cli.cosyvoice.CosyVoice2``): speech tokens (25 per second) ->
    waveform at 24 kHz, read from a model directory like the real one (which, given a path that does not
    exist, tries to download it as a ModelScope id and fails).

    Each token is a short tone whose pitch depends on the token id; loudness follows the voice prompt,
    and a little seeded noise plays the part of flow matching's random start. Like the published
    CosyVoice2 it has ``token2wav`` and no ``inference_token2wav``.
    """

    SETTINGS = "standin_vocoder.json"

    def __init__(self, model_dir, load_jit=False, load_trt=False, fp16=False):
        path = os.path.join(model_dir, self.SETTINGS)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CosyVoice2 model directory {model_dir!r} not found (no {self.SETTINGS})")
        with open(path) as f:
            settings = json.load(f)
        self.sample_rate = int(settings["sample_rate"])
        self.samples_per_token = int(settings["samples_per_token"])

    def token2wav(self, speech_token, speech_token_len, prompt_speech_16k=None, stream=False):
        tokens = speech_token.reshape(-1).long().cpu()
        n = self.samples_per_token
        t = torch.arange(n, dtype=torch.float32) / self.sample_rate
        freq = 110.0 + 15.0 * tokens.float()
        wave = torch.sin(2 * torch.pi * freq[:, None] * t[None, :]).reshape(-1)
        gain = 0.1
        if prompt_speech_16k is not None:
            gain = float(torch.as_tensor(prompt_speech_16k, dtype=torch.float32).pow(2).mean().sqrt()) + 1e-3
        wave = gain * wave + 1e-3 * torch.randn(wave.shape)
        yield {"tts_speech": wave[None, :]}


def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None,
                                  cache_position=None, **kwargs):
    """Patched onto ``llm`` as the published code does. That code takes the cache length from
    ``past_key_values.seen_tokens`` to cut ``input_ids``; the stand-in reads it the same way, then leaves the
    cutting to transformers' own method (which uses ``cache_position``)."""
    cache = kwargs.get("cache", past_key_values)  # transformers 5 passes the cache as ``cache``
    if isinstance(cache, Cache):
        if self.config.standin_cache_length_from == "seen_tokens":
            past_length = cache.seen_tokens  # AttributeError on transformers >= 4.54
        else:
            past_length = cache.get_seq_length()
        if cache_position is not None and int(cache_position[0]) != past_length:
            raise ValueError(f"the cache holds {past_length} positions but generation is at {int(cache_position[0])}")
    if past_key_values is not None:
        kwargs["past_key_values"] = past_key_values
    return type(self).prepare_inputs_for_generation(self, input_ids, attention_mask=attention_mask,
                                                   inputs_embeds=inputs_embeds, cache_position=cache_position, **kwargs)


class MiniCPMTTS(PreTrainedModel):
    config_class = MiniCPMTTSConfig

    def __init__(self, config: MiniCPMTTSConfig, audio_tokenizer=None):
        super().__init__(config)
        self.audio_bos_token_id = config.audio_bos_token_id
        self.num_vq = config.num_vq
        self.num_audio_tokens = config.num_audio_tokens
        self.condition_type = config.condition_type
        self.interleaved = False
        model_config = LlamaConfig(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_attention_heads=config.num_attention_heads,
            num_hidden_layers=config.num_hidden_layers,
            num_key_value_heads=config.num_key_value_heads,
            max_position_embeddings=config.max_position_embeddings,
            vocab_size=8,
        )
        self.emb_text = nn.Embedding(config.num_text_tokens, config.hidden_size)
        self.model = LlamaModel(model_config)
        self.projector_spk = nn.Linear(config.llm_dim, config.hidden_size, bias=False)
        self.projector_semantic = nn.Linear(config.llm_dim, config.hidden_size, bias=False)
        self.audio_tokenizer = audio_tokenizer
        self.emb_code = nn.ModuleList(
            [nn.Embedding(config.num_audio_tokens, config.hidden_size) for _ in range(config.num_vq)]
        )
        self.head_code = nn.ModuleList(
            [nn.Linear(config.hidden_size, config.num_audio_tokens, bias=False) for _ in range(config.num_vq)]
        )
        self.post_init()

    @torch.inference_mode()
    def generate(self, inputs_embeds, eos_token, force_no_stop=False, min_new_token=50, max_new_token=2048,
                 show_tqdm=False, streaming=False, text_lengths=None,
                 sampling_params: TTSSamplingParams = TTSSamplingParams()):  # noqa: B008 (the real signature)
        """Sample audio tokens ``[1, T, num_vq]`` one step at a time (batch size 1 only)."""
        assert inputs_embeds.shape[0] == 1
        device = inputs_embeds.device
        warpers = [TopPLogitsWarper(sampling_params.top_p), TopKLogitsWarper(max(sampling_params.top_k, 3))]
        condition_length = inputs_embeds.shape[1]
        new_tokens = torch.zeros(1, max_new_token, self.num_vq, dtype=torch.long, device=device)
        past = None
        steps = 0
        for t in range(max_new_token):
            if t == 0:
                embeds = inputs_embeds
                position_ids = torch.arange(condition_length, device=device)[None]
            else:
                embeds = sum(self.emb_code[q](new_tokens[:, t - 1 : t, q]) for q in range(self.num_vq))
                position_ids = torch.tensor([[condition_length + t - 1]], device=device)
            out = self.model(inputs_embeds=embeds, position_ids=position_ids, use_cache=True, **{_CACHE_KW: past})
            past = out.past_key_values
            hidden = out.last_hidden_state[:, -1]
            logits = torch.stack([head(hidden) for head in self.head_code], 1).float()  # [1, num_vq, V]
            logits = logits.reshape(-1, self.num_audio_tokens) / sampling_params.temperature
            if t > 0:
                previous = new_tokens[0, :t].T  # [num_vq, t]
                score = torch.gather(logits, 1, previous)
                score = torch.where(score < 0, score * sampling_params.repetition_penalty,
                                    score / sampling_params.repetition_penalty)
                logits = logits.scatter(1, previous, score)
                for warp in warpers:
                    logits = warp(previous, logits)
            if t < min_new_token or force_no_stop:
                logits[:, eos_token] = -torch.inf
            idx = torch.multinomial(F.softmax(logits, -1), num_samples=1).view(1, self.num_vq)
            new_tokens[:, t] = idx
            steps = t + 1
            if idx.eq(eos_token).any():
                break
        ids = new_tokens[:, :steps]
        if ids[0, -1].eq(eos_token).any():
            ids = ids[:, :-1]
        return _TTSOutput(new_ids=ids)


@dataclass
class _TTSOutput:
    new_ids: torch.Tensor


class MiniCPMOPreTrainedModel(PreTrainedModel):
    config_class = MiniCPMOConfig
    base_model_prefix = "llm"


class MiniCPMO(MiniCPMOPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.llm = Qwen3ForCausalLM(config)
        self.llm.prepare_inputs_for_generation = types.MethodType(prepare_inputs_for_generation, self.llm)
        self.embed_dim = config.hidden_size
        if config.init_audio:
            self.audio_projection_layer = nn.Linear(config.audio_feature_bins, self.embed_dim)
        if config.init_tts:
            self.tts = MiniCPMTTS(config.tts_config, audio_tokenizer=None)
        self.terminators = ["<|im_end|>", "<|endoftext|>"]
        self.think_str = "<think>\\n\\n</think>\\n\\n"
        self.processor = None
        self.post_init()

    def init_tts(self, streaming=False, model_dir=None, enable_float16=False, n_timesteps=10):
        if streaming:
            raise NotImplementedError("the tiny stand-in has no streaming Token2wav")
        if self.config.tts_config.audio_tokenizer_type != "s3tokenizer":
            self.tts.config.audio_tokenizer_type = "s3tokenizer"
        # as published: relative to _name_or_path, i.e. local only when loaded from a directory
        model_dir = model_dir or os.path.join(self.config._name_or_path, "assets/CosyVoice2-0.5B")
        self.tts.audio_tokenizer = TinyCosyVoice2(model_dir=model_dir, load_jit=False, load_trt=False, fp16=False)
        return self.tts.audio_tokenizer

    # -- audio input ------------------------------------------------------------------------------
    def _audio_features(self, wav16k: np.ndarray) -> torch.Tensor:
        """16 kHz waveform -> ``[frames, audio_feature_bins]`` log-spectrum features (25 frames/s)."""
        n = self.config.audio_frame_samples
        wav = torch.as_tensor(np.asarray(wav16k, dtype=np.float32))
        frames = max(1, wav.numel() // n)
        wav = F.pad(wav, (0, max(0, frames * n - wav.numel())))[: frames * n].reshape(frames, n)
        spec = torch.fft.rfft(wav, dim=-1).abs()
        pooled = F.adaptive_avg_pool1d(spec[:, None, :], self.config.audio_feature_bins)[:, 0]
        return torch.log(pooled + 1e-5)

    @staticmethod
    def prepare_generation_config(do_sample, max_new_tokens=50, min_new_tokens=0, **kwargs):
        num_beams = kwargs.get("num_beams", 3)
        config = {"num_beams": num_beams, "top_p": 0.8, "top_k": 100, "temperature": 0.7, "do_sample": True,
                  "repetition_penalty": 1.02}
        if do_sample:
            pass
        elif num_beams > 1:
            config.update({"repetition_penalty": 1.2, "do_sample": False})
        else:
            config.update({"do_sample": False, "repetition_penalty": 1.02})
            for key in ("top_p", "top_k", "temperature"):
                config.pop(key)  # greedy: sampling knobs unused
        config.update((k, kwargs[k]) for k in config.keys() & kwargs.keys())
        config["min_new_tokens"] = min_new_tokens
        config["max_new_tokens"] = max_new_tokens
        return config

    @torch.inference_mode()
    def chat(self, image=None, msgs=None, vision_hidden_states=None, max_new_tokens=4096, min_new_tokens=0,
             do_sample=True, max_inp_length=8192, stream=False, stream_input=False, max_slice_nums=None,
             use_image_id=None, enable_thinking=False, use_tts_template=False, generate_audio=False,
             output_audio_path=None, output_tts_inputs_embeds_path=None, omni_mode=False, teacher_forcing=False,
             return_prompt=False, tts_proj_layer=-1, tts_sampling_params: TTSSamplingParams = TTSSamplingParams(),  # noqa: B008 (the real signature)
             merge_audio_from_same_content=True, **kwargs):
        if isinstance(msgs, str):
            msgs = json.loads(msgs)
        assert msgs, "msgs is empty"
        if isinstance(msgs[0], list):
            raise NotImplementedError("the tiny stand-in runs one conversation at a time")
        if self.processor is None:
            self.processor = TinyTokenizer(self.config.vocab_size)
        tok = self.processor
        copy_msgs = deepcopy(msgs)
        audios = []
        for i, msg in enumerate(copy_msgs):
            assert msg["role"] in ["system", "user", "assistant"]
            if i == 0:
                assert msg["role"] in ["user", "system"], "The role of first msg should be user"
            content = msg["content"] if isinstance(msg["content"], list) else [msg["content"]]
            parts = []
            for c in content:
                if isinstance(c, np.ndarray):
                    audios.append(c)
                    parts.append("<audio>./</audio>")
                    use_tts_template = True
                elif isinstance(c, str):
                    parts.append(c)
            msg["content"] = "\n".join(parts)
        prompt = tok.apply_chat_template(copy_msgs, add_generation_prompt=True, use_tts_template=use_tts_template,
                                         enable_thinking=enable_thinking,
                                         think_str=self.think_str.replace("\\n", "\n"))
        # each audio placeholder becomes <|audio_start|> <unk> x frames <|audio_end|>
        features = [self._audio_features(a) for a in audios]
        pieces = prompt.split("<audio>./</audio>")
        ids = tok.encode(pieces[0])
        audio_slots = []
        for feat, piece in zip(features, pieces[1:], strict=True):
            ids.append(tok.stoi["<|audio_start|>"])
            audio_slots.append((len(ids), feat))
            ids.extend([tok.stoi["<unk>"]] * feat.shape[0])
            ids.append(tok.stoi["<|audio_end|>"])
            ids.extend(tok.encode(piece))
        input_ids = torch.tensor([ids[-max_inp_length:]], device=self.device)
        embeds = self.llm.get_input_embeddings()(input_ids)
        for start, feat in audio_slots:
            proj = self.audio_projection_layer(feat.to(self.device, embeds.dtype))
            embeds[0, start : start + proj.shape[0]] = proj

        gen = self.prepare_generation_config(do_sample=do_sample, max_new_tokens=max_new_tokens,
                                             min_new_tokens=min_new_tokens, **kwargs)
        terminators = [tok.convert_tokens_to_ids(t) for t in self.terminators]
        outputs = self.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids),
                                    pad_token_id=0, eos_token_id=terminators, output_hidden_states=True,
                                    return_dict_in_generate=True,
                                    **{**gen, "max_new_tokens": 1 if teacher_forcing else max_new_tokens})
        generated = outputs.sequences[0]
        text_ids = generated[generated != 0]
        if text_ids.numel() and int(text_ids[-1]) in terminators:
            text_ids = text_ids[:-1]
        answer = tok.decode(text_ids.tolist()).split("<|tts_eos|>")[0]

        full = torch.cat([input_ids[0], generated])
        bos_id, eos_id = tok.stoi["<|tts_bos|>"], tok.stoi["<|tts_eos|>"]
        bos = [i + 1 for i, x in enumerate(full.tolist()) if x == bos_id]
        eos = [i for i, x in enumerate(full.tolist()) if x == eos_id]
        tts_bound = (bos[-1] if bos else -1, eos[-1] if eos else None)

        if use_tts_template and generate_audio and output_audio_path:
            import soundfile as sf

            try:
                wave = self._generate_speech_non_streaming(outputs, full, tts_bound, tts_proj_layer,
                                                           audios[0] if audios else None, tts_sampling_params)
                sf.write(output_audio_path, wave.float().cpu().numpy(), samplerate=24000)
            except Exception:  # the real chat swallows TTS errors the same way
                traceback.print_exc()
        return (answer, prompt) if return_prompt else answer

    @torch.inference_mode()
    def _generate_speech_non_streaming(self, outputs, full, tts_bound, tts_proj_layer, audio_prompt,
                                       tts_sampling_params):
        hidden = torch.vstack([step[tts_proj_layer][0] for step in outputs.hidden_states])  # [positions, H]
        start, end = tts_bound
        end = min(end if end is not None else full.numel(), hidden.shape[0])  # stand-in: align lengths
        if self.tts.condition_type != "hidden_text_merge":
            raise NotImplementedError  # the published code builds the TTS condition for this type only
        tokens = full[start:end].to(self.tts.emb_text.weight.device)
        tts_embeds = self.tts.emb_text(tokens) + self.tts.projector_semantic(hidden[start:end])
        if self.tts.config.normalize_projected_hidden:
            tts_embeds = F.normalize(tts_embeds, p=2, dim=-1)
        dev = self.tts.emb_text.weight.device
        text_eos = self.tts.emb_text(torch.tensor([self.tts.config.text_eos_token_id], device=dev))
        audio_bos = self.tts.emb_text(torch.tensor([self.tts.audio_bos_token_id], device=dev))
        inputs_embeds = torch.cat([tts_embeds, text_eos, audio_bos], 0)[None]
        out = self.tts.generate(inputs_embeds=inputs_embeds, sampling_params=tts_sampling_params,
                                eos_token=torch.tensor([self.tts.config.num_audio_tokens - 1], device=dev))
        if self.tts.config.audio_tokenizer_type != "s3tokenizer":
            raise NotImplementedError
        tokens = out.new_ids.squeeze(-1)
        prompt = torch.tensor(audio_prompt)[None] if audio_prompt is not None else None
        if self.tts.config.s3_stream_generate:  # read unguarded, as published
            wave = self.tts.audio_tokenizer.inference_token2wav(
                speech_tokens=tokens, prompt_speech_16k=prompt, prompt_speech=None, stream=True,
                n_timesteps=self.tts.config.s3_stream_n_timesteps, code_chunk_size=self.tts.config.s3_stream_chunk_size,
                chunk_prelook_size=self.tts.config.s3_stream_prelook_size, use_attn_idx=False)
            return wave[0]
        for chunk in self.tts.audio_tokenizer.token2wav(speech_token=tokens,
                                                       speech_token_len=torch.tensor([tokens.shape[1]]),
                                                       prompt_speech_16k=prompt, stream=False):
            wave = chunk["tts_speech"]
        return wave[0]
