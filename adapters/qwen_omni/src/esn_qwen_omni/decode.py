"""Qwen2.5-Omni's thinker and talker decoded through ``esn.decode``: static steps over the same modules.

transformers' ``Qwen2_5OmniForConditionalGeneration.generate`` runs the thinker's ``generate`` (keeping
every hidden state), builds the talker's inputs from them, then runs the talker's ``generate``, whose
``thinker_reply_part`` input shrinks by one position per step (so its shapes change every step). Here
the same three stages run with static shapes:

- thinker: prefill through ``thinker.model`` (the ``lm`` stream root) and ``lm_head``; each decode step
  feeds the token's embedding with a 4D mask over a ``StaticCache`` and writes ``last hidden + embedding``
  (the talker's "reply part") into a static buffer at its step;
- talker inputs: ``generate``'s construction, value for value (prompt hidden states + embeddings with the
  audio positions zeroed, the speaker's text bos, the reply part ending in text eos/pad per row);
- talker: prefill through ``talker`` (the ``synth`` root) exactly as ``generate`` calls it; each decode
  step reads its reply position ``min(step, last)`` from the static buffer by a device index.

Hook points and module paths are the adapter's (``thinker.model.language_model.layers.*.mlp.act_fn``,
``talker.model.layers.*.mlp.act_fn``); recording and steering hooks run inside the captured steps.
Positions follow ``generate``: the thinker continues its prompt's 3D rope positions by one per step, the
talker adds its ``rope_deltas`` to the cache length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from esn.decode import Decoder, DecodeState, Greedy, left_padding, prompt_positions
from esn.decode.policy import Sessions
from esn.decode.static import StaticKV, bucket, check_generation_config
from esn.errors import EsnError


class ThinkerDecoding(StaticKV):
    """The thinker at one batch size and cache length: prefill, decode step, and the reply buffer."""

    def __init__(self, thinker: Any, batch: int, max_len: int, greedy: Greedy, capture: bool):
        device, dtype = thinker.lm_head.weight.device, thinker.lm_head.weight.dtype
        super().__init__(thinker.config, batch, max_len, device)
        self.thinker = thinker
        self.embed = thinker.get_input_embeddings()
        hidden = thinker.config.get_text_config().hidden_size
        self.reply = torch.zeros((batch, greedy.max_new_tokens, hidden), dtype=dtype, device=device)  # [B, N, H]
        self.next_position = torch.zeros((4, batch, 1), dtype=torch.long, device=device)  # text + 3D rope
        self.decoder = Decoder(thinker, self.step, batch=batch, vocab=thinker.lm_head.out_features,
                               greedy=greedy, device=device, capture=capture)

    def prefill(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt (ids, mask, audio features) into the cache: first logits ``[B, V]``, hidden ``[B, P, H]``."""
        ids, mask, features = inputs["input_ids"], inputs["attention_mask"], inputs["feature_attention_mask"]
        self.start(mask)
        # generate's positions: text positions from the mask, then the 3D rope positions of the audio prompt
        rope, _ = self.thinker.get_rope_index(ids, None, None, mask, False, features.sum(-1), None)
        positions = torch.cat([prompt_positions(mask)[None], rope])  # [4, B, P]
        self.next_position.copy_(positions[..., -1:] + 1)
        out = self.thinker.model(
            input_ids=ids,
            input_features=inputs["input_features"],
            feature_attention_mask=features,
            attention_mask=mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
        )
        hidden = out.last_hidden_state  # [B, P, H], after the final norm
        return self.thinker.lm_head(hidden[:, -1:])[:, -1], hidden

    def step(self, state: DecodeState) -> torch.Tensor:
        """One thinker step: logits ``[B, V]``; writes the talker's reply part of this step."""
        ids = state.ids  # [B, 1]
        embeds = self.embed(ids)  # [B, 1, H]
        out = self.thinker.model(
            input_ids=ids,  # the lm root sees the fed ids (stop tokens) ...
            inputs_embeds=embeds,  # ... and the step reuses the embedding it needs for the talker anyway
            attention_mask=self.step_mask(state),
            position_ids=self.next_position + state.step,  # [4, B, 1]
            cache=self.cache,
            use_cache=True,
        )
        hidden = out.last_hidden_state  # [B, 1, H]
        self.reply.index_copy_(1, state.step, hidden + embeds)  # generate's thinker_reply_part, one step
        return self.thinker.lm_head(hidden)[:, -1]  # [B, V]


class TalkerDecoding(StaticKV):
    """The talker at one batch size and cache length; its reply input is read from a static buffer."""

    def __init__(self, talker: Any, batch: int, max_len: int, reply_len: int, greedy: Greedy, capture: bool):
        device, dtype = talker.codec_head.weight.device, talker.thinker_to_talker_proj.weight.dtype
        super().__init__(talker.config, batch, max_len, device)
        self.talker = talker
        width = talker.thinker_to_talker_proj.in_features
        self.reply = torch.zeros((batch, reply_len, width), dtype=dtype, device=device)  # [B, R, H_thinker]
        self.reply_last = torch.zeros(1, dtype=torch.long, device=device)
        self.next_position = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.decoder = Decoder(talker, self.step, batch=batch, vocab=talker.codec_head.out_features,
                               greedy=greedy, device=device, capture=capture)

    def prefill(self, embeds: torch.Tensor, text_ids: torch.Tensor, reply: torch.Tensor, mask: torch.Tensor,
                audio_lengths: torch.Tensor) -> torch.Tensor:
        """``generate``'s first talker forward (on thinker embeddings ``[B, P+2, H]``); logits ``[B, V]``."""
        self.start(mask)
        out = self.talker(
            input_ids=None,
            inputs_embeds=embeds.clone(),  # the talker adds its codec pad/bos embeddings in place
            attention_mask=mask,
            cache=self.cache,
            use_cache=True,
            thinker_reply_part=reply,
            input_text_ids=text_ids,
            audio_feature_lengths=audio_lengths,
            use_audio_in_video=False,
        )
        r = reply.shape[1]
        self.reply[:, :r] = reply
        self.reply_last.fill_(r - 1)
        # generate's decode positions: cache length + rope_deltas (set by the prefill above)
        self.next_position.copy_(mask.shape[1] + self.talker.rope_deltas)
        return out.logits[:, -1]

    def step(self, state: DecodeState) -> torch.Tensor:
        """One talker step on its reply position ``min(step, last)``: codec logits ``[B, V]``."""
        reply = self.reply.index_select(1, torch.minimum(state.step, self.reply_last))  # [B, 1, H]
        out = self.talker(
            input_ids=state.ids,  # [B, 1]: the synth root sees the fed codec id
            attention_mask=self.step_mask(state),
            position_ids=(self.next_position + state.step).expand(3, -1, -1),  # [3, B, 1]
            cache=self.cache,
            thinker_reply_part=reply,
            use_cache=True,
        )
        return out.logits[:, -1]  # [B, V] float32


@dataclass
class Generated:
    """What the thinker and talker produced: text tokens ``[B, n]`` and each row's codes ``[1, k]``."""

    text: torch.Tensor
    codes: list[torch.Tensor]
    info: dict[str, Any]


def talker_inputs(model: Any, ids: torch.Tensor, mask: torch.Tensor, prompt_hidden: torch.Tensor,
                  reply: torch.Tensor, text: torch.Tensor, speaker_bos: int, eos_ids: tuple[int, ...]) -> dict:
    """``generate``'s talker inputs from the thinker's outputs (same formulas, same order of operations).

    ``prompt_hidden`` ``[B, P, H]`` last hidden states of the prompt; ``reply`` ``[B, n-1, H]`` last hidden +
    embedding of each fed generated token; ``text`` ``[B, n]`` the generated tokens.
    """
    talker, thinker = model.talker, model.thinker
    batch, device = ids.shape[0], ids.device
    embed = thinker.get_input_embeddings()

    def full(value: int) -> torch.Tensor:
        return torch.full((batch, 1), value, dtype=torch.long, device=device)

    prompt_embeds = embed(ids).masked_fill((ids == model.config.thinker_config.audio_token_index)[..., None], 0)
    embeds = torch.cat([prompt_hidden + prompt_embeds, embed(full(speaker_bos)), reply[:, :1]], dim=1)
    eos_embedding, pad_embedding = embed(full(talker.text_eos_token)), embed(full(talker.text_pad_token))
    reply = torch.cat([reply[:, 1:], eos_embedding, pad_embedding], dim=1)
    # each row's reply ends in text eos right after its last real token, then pads
    n = text.shape[1]
    is_eos = (text.unsqueeze(-1) == torch.as_tensor(eos_ids, device=device)).any(-1)
    first_eos = torch.where(is_eos, torch.arange(n, device=device), n).min(-1).values.clamp(min=1, max=n - 1)
    at = torch.arange(reply.shape[1], device=device).unsqueeze(0)
    reply = torch.where((at >= first_eos.unsqueeze(1)).unsqueeze(-1), pad_embedding, reply)
    reply = torch.where((at == (first_eos - 1).unsqueeze(1)).unsqueeze(-1), eos_embedding, reply)
    return {
        "embeds": embeds,  # [B, P + 2, H]
        "text_ids": torch.cat([ids, full(speaker_bos), text[:, :1]], dim=1),
        "codec_ids": torch.cat([torch.full_like(ids, talker.codec_mask_token), full(talker.codec_pad_token),
                                full(talker.codec_bos_token)], dim=1),  # generate's talker input_ids
        "reply": reply,  # [B, n, H]
        "mask": torch.cat([mask, mask.new_ones((batch, 2))], dim=1),
    }


@torch.inference_mode()
def generate_codes(model: Any, sessions: Sessions, inputs: dict[str, torch.Tensor], *, speaker_bos: int,
                   thinker: Greedy, talker: Greedy, capture: bool) -> Generated:
    """Thinker, then talker, through ``esn.decode``: text tokens and each row's codec codes."""
    ids = inputs["input_ids"]
    batch, p = ids.shape
    check_generation_config(model.thinker.generation_config, "thinker")
    check_generation_config(model.talker.generation_config, "talker")
    t = sessions.get("thinker", (batch, bucket(p + thinker.max_new_tokens), thinker, capture),
                     lambda: ThinkerDecoding(model.thinker, batch, bucket(p + thinker.max_new_tokens), thinker, capture))
    first, prompt_hidden = t.prefill(inputs)
    text = t.decoder.run(first, prompt_ids=ids, penalty_ignore=left_padding(inputs["attention_mask"]))
    n = text.length
    if n < 2:
        raise EsnError("the thinker ended its reply after one token; the talker needs at least two "
                       "(set thinker_min_new_tokens)")
    made = talker_inputs(model, ids, inputs["attention_mask"], prompt_hidden, t.reply[:, : n - 1], text.tokens,
                         speaker_bos, thinker.eos_token_ids)
    length = bucket(made["mask"].shape[1] + talker.max_new_tokens)
    k = sessions.get("talker", (batch, length, thinker.max_new_tokens, talker, capture),
                     lambda: TalkerDecoding(model.talker, batch, length, thinker.max_new_tokens, talker, capture))
    first = k.prefill(made["embeds"], made["text_ids"], made["reply"], made["mask"],
                      inputs["feature_attention_mask"].sum(-1))
    codes = k.decoder.run(first, prompt_ids=made["codec_ids"], penalty_ignore=left_padding(made["mask"]))
    stop = torch.as_tensor(talker.eos_token_ids, device=codes.tokens.device)
    hit = (codes.tokens.unsqueeze(-1) == stop).any(-1)
    ends = torch.where(hit.any(1), hit.int().argmax(1), codes.length).tolist()  # codes before the first stop id
    rows = [codes.tokens[i : i + 1, :end] for i, end in enumerate(ends)]
    info = {"thinker": text.info, "talker": codes.info}
    return Generated(text.tokens, rows, info)
