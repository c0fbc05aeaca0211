"""Qwen3-Omni's thinker and talker decoded through ``esn.decode``: static steps over the same modules.

transformers' ``Qwen3OmniMoeForConditionalGeneration.generate`` runs the thinker's ``generate`` (keeping
every hidden state), builds the talker's inputs from the prompt's embeddings and layer
``accept_hidden_layer`` hidden states, then runs the talker's ``generate``; before each talker step its
``prepare_inputs_for_generation`` runs a whole ``code_predictor.generate`` (greedy, ``num_code_groups - 1``
residual codes) and feeds the sum of the codec embeddings plus the step's text hidden. Here the same
stages run with static shapes:

- thinker: prefill through ``thinker`` (the ``lm`` stream root) with hidden states; each decode step
  feeds the token with a 4D mask over a ``StaticCache`` and the next text + 3D rope positions;
- talker inputs: ``generate``'s construction (the model's own ``_get_talker_user_parts`` /
  ``_get_talker_assistant_parts``, each row's text eos moved after its last real token);
- talker: prefill through ``talker`` (the ``synth`` root) as ``generate`` calls it; each decode step runs
  the code predictor UNROLLED (its own small ``StaticCache``: a 2-position prefill then
  ``num_code_groups - 2`` one-position steps, argmax of each head), writes the step's codes into a static
  ``[B, N, groups]`` buffer, then the talker forward, whose last hidden state feeds the next step.

Every step reads and writes static buffers only (device indices, no host branch), so ``esn.decode``
captures it as one CUDA graph; on CPU the same steps run eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from esn.decode import Decoder, DecodeState, Greedy, left_padding
from esn.decode.policy import Sessions
from esn.decode.static import StaticKV, bucket, check_generation_config
from esn.errors import EsnError

CODE2WAV_CHUNKING = (300, 25)  # generate's chunked_decode(chunk_size, left_context_size)


class _Static(StaticKV):
    """``StaticKV`` plus the next text + 3D rope positions ``[4, B, 1]`` (decode continues the prompt's)."""

    def __init__(self, config: Any, batch: int, max_len: int, device: torch.device):
        super().__init__(config, batch, max_len, device)
        self.next_position = torch.zeros((4, batch, 1), dtype=torch.long, device=device)  # text + 3D rope

    def start(self, mask: torch.Tensor, positions: torch.Tensor) -> None:
        """A new prompt: key mask ``[B, P]``, positions ``[4, B, P]``; decode continues them by one per step."""
        super().start(mask)
        self.next_position.copy_(positions[..., -1:] + 1)  # generate: last position + 1, every row of the 4


class ThinkerDecoding(_Static):
    """The thinker at one batch size and cache length: prefill (with hidden states) and decode step."""

    def __init__(self, thinker: Any, batch: int, max_len: int, greedy: Greedy, capture: bool):
        device = thinker.lm_head.weight.device
        super().__init__(thinker.config, batch, max_len, device)
        self.thinker = thinker
        self.decoder = Decoder(thinker, self.step, batch=batch, vocab=thinker.lm_head.out_features,
                               greedy=greedy, device=device, capture=capture)

    def prefill(self, inputs: dict[str, torch.Tensor], accept_layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prompt into the cache: first logits ``[B, V]``, the prompt's input embeddings ``[B, P, H]``
        (audio merged in) and its layer-``accept_layer`` hidden states ``[B, P, H]``."""
        ids, mask, features = inputs["input_ids"], inputs["attention_mask"], inputs["feature_attention_mask"]
        # generate's positions (private helper: text positions from the mask, 3D rope of the audio prompt)
        positions = self.thinker._prepare_position_ids_for_generation(
            ids, {"input_ids": ids, "attention_mask": mask, "feature_attention_mask": features})
        self.start(mask, positions)
        out = self.thinker(
            input_ids=ids,
            input_features=inputs["input_features"],
            feature_attention_mask=features,
            attention_mask=mask,  # 2D: the stream root sees the padding, as in generate
            position_ids=positions,  # [4, B, P]
            cache=self.cache,
            use_cache=True,
            output_hidden_states=True,
        )
        return out.logits[:, -1], out.hidden_states[0], out.hidden_states[accept_layer]

    def step(self, state: DecodeState) -> torch.Tensor:
        """One thinker step on ``state.ids`` ``[B, 1]``: logits ``[B, V]``."""
        out = self.thinker(
            input_ids=state.ids,
            attention_mask=self.step_mask(state),  # [B, 1, 1, L] bool, True = attend
            position_ids=self.next_position + state.step,  # [4, B, 1]
            cache=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1]


class TalkerDecoding(_Static):
    """The talker (code predictor unrolled in its step) at one batch size, cache length and text length.

    Static buffers besides the caches: ``text`` ``[B, T, H]`` the text hidden of each step (generate's
    ``trailing_text_hidden``, then ``tts_pad_embed`` to the end), ``past_hidden`` ``[B, 1, H]`` the last
    talker hidden state, ``codes`` ``[B, N, groups]`` every step's codes (group 0 = the fed codec id).
    """

    def __init__(self, talker: Any, batch: int, max_len: int, text_len: int, greedy: Greedy, capture: bool):
        from transformers import StaticCache

        device = talker.codec_head.weight.device
        super().__init__(talker.config, batch, max_len, device)
        self.talker = talker
        self.predictor = talker.code_predictor
        self.groups = talker.config.num_code_groups
        hidden = talker.codec_head.in_features
        dtype = talker.codec_head.weight.dtype
        self.text = torch.zeros((batch, text_len, hidden), dtype=dtype, device=device)  # [B, T, H]
        self.text_last = torch.tensor([text_len - 1], device=device)
        self.past_hidden = torch.zeros((batch, 1, hidden), dtype=dtype, device=device)  # [B, 1, H]
        self.codes = torch.zeros((batch, greedy.max_new_tokens, self.groups), dtype=torch.long, device=device)
        # the code predictor's own cache: positions 0-1 (prefill), then one per residual code
        g = self.groups
        self.predictor_cache = StaticCache(config=self.predictor.config, max_cache_len=g)
        keys = torch.arange(g, device=device)
        self.predictor_masks = [(keys <= torch.arange(2, device=device)[:, None]).expand(batch, 1, 2, g)]  # [B, 1, q, G]
        self.predictor_positions = [torch.arange(2, device=device).expand(batch, 2)]  # [B, q]
        for p in range(2, g):
            self.predictor_masks.append((keys <= p).expand(batch, 1, 1, g))
            self.predictor_positions.append(torch.full((batch, 1), p, device=device))
        self.decoder = Decoder(talker, self.step, batch=batch, vocab=talker.codec_head.out_features,
                               greedy=greedy, device=device, capture=capture)

    def prefill(self, made: dict[str, torch.Tensor], audio_lengths: torch.Tensor) -> torch.Tensor:
        """``generate``'s first talker forward on the made inputs (see :func:`talker_inputs`): logits ``[B, V]``."""
        embeds, mask, ids = made["embeds"], made["mask"], made["ids"]
        positions = self.talker._prepare_position_ids_for_generation(
            embeds, {"attention_mask": mask, "talker_input_ids": ids, "audio_feature_lengths": audio_lengths})
        self.start(mask, positions)
        trailing = made["trailing"]
        r = trailing.shape[1]
        if r >= self.text.shape[1]:
            raise EsnError(f"the talker's text input of {r} positions does not fit its buffer of {self.text.shape[1]}")
        self.text[:, :r] = trailing
        self.text[:, r:] = made["tts_pad"]
        out = self.talker(
            inputs_embeds=embeds,  # [B, P, H]
            attention_mask=mask,
            position_ids=positions,  # [4, B, P]
            cache=self.cache,
            use_cache=True,
            output_hidden_states=True,
            talker_input_ids=ids,
            trailing_text_hidden=trailing,
            tts_pad_embed=made["tts_pad"],
        )
        self.past_hidden.copy_(out.hidden_states[0][-1][:, -1:])  # last layer (normed), last position
        return out.logits[:, -1]

    def _residual_codes(self, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``code_predictor.generate`` (greedy) unrolled: codes ``[B, groups - 1]`` and the sum of their
        input embeddings ``[B, 1, H]`` (each code through the embedding of its group)."""
        for layer in self.predictor_cache.layers:  # a fresh sequence: overwrite from position 0
            layer.cumulative_length.zero_()
        embeddings = self.predictor.get_input_embeddings()
        out = self.predictor(
            inputs_embeds=torch.cat([self.past_hidden, last], dim=1),  # [B, 2, H]: picks lm_head[0]
            attention_mask=self.predictor_masks[0],
            position_ids=self.predictor_positions[0],
            cache=self.predictor_cache,
            use_cache=True,
        )
        codes, embeds = [], [last]
        for i in range(1, self.groups):
            code = out.logits[:, -1].float().argmax(-1, keepdim=True)  # [B, 1]
            codes.append(code)
            embeds.append(embeddings[i - 1](code))  # [B, 1, H]
            if i == self.groups - 1:
                break
            out = self.predictor(
                input_ids=code,  # generation_steps i: codec_embedding[i - 1], lm_head[i]
                generation_steps=i,
                attention_mask=self.predictor_masks[i],
                position_ids=self.predictor_positions[i],
                cache=self.predictor_cache,
                use_cache=True,
            )
        # one sum over the groups, as generate (in bf16 a chain of additions would round differently)
        return torch.cat(codes, dim=1), torch.cat(embeds, dim=1).sum(1, keepdim=True)

    def step(self, state: DecodeState) -> torch.Tensor:
        """One talker step on the fed codec id ``state.ids`` ``[B, 1]``: residual codes, then codec logits ``[B, V]``."""
        ids = state.ids
        last = self.talker.get_input_embeddings()(ids)  # [B, 1, H]
        residual, summed = self._residual_codes(last)
        self.codes.index_copy_(1, state.step, torch.cat([ids, residual], dim=1).unsqueeze(1))
        text = self.text.index_select(1, torch.minimum(state.step, self.text_last))  # [B, 1, H]
        out = self.talker(
            input_ids=ids,  # the synth root sees the fed codec id
            inputs_embeds=summed + text,
            attention_mask=self.step_mask(state),
            position_ids=self.next_position + state.step,  # [4, B, 1]
            cache=self.cache,
            use_cache=True,
            output_hidden_states=True,
            generation_step=0,  # unused after the prefill (the text hidden is indexed above)
        )
        self.past_hidden.copy_(out.hidden_states[0][-1][:, -1:])
        return out.logits[:, -1]


def talker_inputs(model: Any, ids: torch.Tensor, mask: torch.Tensor, text: torch.Tensor, prompt_embeds: torch.Tensor,
                  prompt_hidden: torch.Tensor, speaker_id: int, eos_ids: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """``generate``'s talker inputs from the prompt ``ids``/``mask`` ``[B, P]``, the generated ``text``
    ``[B, n]``, the prompt's input embeddings and accept-layer hidden states ``[B, P, H]``.

    Returns ``embeds`` ``[B, P_t, H_t]``, ``ids`` and ``mask`` ``[B, P_t]``, ``trailing`` ``[B, R, H_t]``
    (one text hidden per talker step) and ``tts_pad`` ``[B, 1, H_t]``.
    """
    config, talker = model.config, model.talker
    batch, p = ids.shape
    device = ids.device
    embed = model.thinker.get_input_embeddings()
    # generate concatenates hidden_states[0] of every thinker forward: the prompt, then each fed token
    thinker_embed = torch.cat([prompt_embeds, embed(text[:, :-1])], dim=1)  # [B, P + n - 1, H]
    sequences = torch.cat([ids, text], dim=1)
    tc = config.thinker_config
    multimodal = (sequences == tc.audio_token_id) | (sequences == tc.image_token_id) | (sequences == tc.video_token_id)

    # the user turn: positions whose last <|im_start|> is followed by the user role, right-aligned
    at = torch.arange(p, device=device).expand(batch, p)
    starts = torch.where(ids == config.im_start_token_id, at, -1).cummax(-1).values.clamp_min(0)
    role = ids.gather(1, (starts + 1).clamp_max(p - 1))
    user = (role == config.user_token_id) & mask.bool()
    lengths = user.sum(-1)
    width = int(lengths.max())
    order = torch.where(user, p + at, at).argsort(dim=-1)[:, -width:]  # user positions last, in order
    parts = model._get_talker_user_parts(0, p, multimodal, prompt_hidden, thinker_embed)
    user_embeds = parts.gather(1, order.unsqueeze(-1).expand(-1, -1, parts.shape[-1]))
    user_ids = ids.gather(1, order)
    user_mask = (torch.arange(width, device=device) >= (width - lengths)[:, None]).to(mask.dtype)

    opens = (ids[0, :-1] == config.im_start_token_id) & (ids[0, 1:] == config.assistant_token_id)
    if not bool(opens.any()):
        raise EsnError("the prompt has no assistant turn (<|im_start|> + assistant role); the talker needs one")
    start = int(opens.nonzero().flatten()[-1])
    special = torch.tensor([[config.tts_bos_token_id, config.tts_eos_token_id, config.tts_pad_token_id]], device=device)
    bos, eos, pad = talker.text_projection(embed(special)).chunk(3, dim=1)  # 3 x [1, 1, H_t]
    assistant_embeds, assistant_ids, trailing = model._get_talker_assistant_parts(
        start, sequences.shape[1], speaker_id, thinker_embed, pad, bos, eos)
    # each row's text eos goes right after its last real token, pads after it (generate, batched rows)
    n = text.shape[1]
    hit = (text.unsqueeze(-1) == torch.as_tensor(eos_ids, device=device)).any(-1)
    first = torch.where(hit, torch.arange(n, device=device), n).min(-1).values[:, None]  # [B, 1]
    j = torch.arange(trailing.shape[1], device=device)
    trailing = torch.where((j > first).unsqueeze(-1), pad.to(trailing.dtype), trailing)
    trailing = torch.where((j == first).unsqueeze(-1), eos.to(trailing.dtype), trailing)
    return {
        "embeds": torch.cat([user_embeds, assistant_embeds], dim=1),
        "ids": torch.cat([user_ids, assistant_ids], dim=1),
        "mask": torch.cat([user_mask, mask.new_ones((batch, assistant_embeds.shape[1]))], dim=1),
        "trailing": trailing,
        "tts_pad": pad.expand(batch, -1, -1),
    }


@dataclass
class Generated:
    """What the thinker and talker produced: text tokens ``[B, n]``, the talker's codec tokens ``[B, m]``,
    codes ``[B, groups, m - 1]`` (one column per talker decode step, as generate collects them)."""

    text: torch.Tensor
    tokens: torch.Tensor
    codes: torch.Tensor
    info: dict[str, Any]


def step_experts(model: Any, chosen: str | None) -> str | dict[str, str] | None:
    """The experts implementation of the decode steps: ``chosen``, else ``generate``'s own switch (off the
    CPU its decode loop runs ``batched_mm`` where the model has ``grouped_mm``), else None (unchanged)."""
    if chosen:
        return chosen
    current = model.get_experts_implementation()
    if model.device.type != "cpu" and "grouped_mm" in current.values():
        return {k: "batched_mm" if v == "grouped_mm" else v for k, v in current.items()}
    return None


class _Experts:
    """Sets the decode steps' experts implementation (None: keep the model's), restored afterwards."""

    def __init__(self, model: Any, impl: str | dict[str, str] | None):
        self.model, self.impl, self.before = model, impl, None

    def __enter__(self):
        if self.impl:
            self.before = self.model.get_experts_implementation()
            self.model.set_experts_implementation(self.impl)

    def __exit__(self, *exc):
        if self.before is not None:
            self.model.set_experts_implementation(self.before)


@torch.inference_mode()
def generate_codes(model: Any, sessions: Sessions, inputs: dict[str, torch.Tensor], *, speaker_id: int,
                   thinker: Greedy, talker: Greedy, capture: bool, experts: str | None = None) -> Generated:
    """Thinker, then talker, through ``esn.decode``: text tokens, codec tokens and every group's codes.

    ``experts``: the experts implementation of the decode steps (see :func:`step_experts`; prefills keep
    the model's)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    steps = step_experts(model, experts)
    impls = steps or model.get_experts_implementation()
    if capture and "eager" in (set(impls.values()) if isinstance(impls, dict) else {impls}):
        # it loops over the routed experts with host-side indexing
        raise EsnError("decode='graph' captures the decode steps as CUDA graphs, which the eager experts "
                       "implementation cannot be part of: set decode_experts='grouped_mm' (or batched_mm)")
    key = tuple(sorted(steps.items())) if isinstance(steps, dict) else steps
    batch, p = ids.shape
    check_generation_config(model.thinker.generation_config, "thinker")
    check_generation_config(model.talker.generation_config, "talker")
    predictor = model.talker.code_predictor
    check_generation_config(predictor.generation_config, "code predictor",
                            ("repetition_penalty", "suppress_tokens", "min_new_tokens"))
    stop = predictor.generation_config.eos_token_id  # the unrolled predictor never stops early
    if any(0 <= int(i) < predictor.config.vocab_size for i in ([] if stop is None else torch.tensor(stop).flatten())):
        raise EsnError(f"the code predictor's generation config stops at code {stop!r}, which decode='graph' does "
                       "not reproduce; use decode='generate'")
    length = bucket(p + thinker.max_new_tokens)
    t = sessions.get("thinker", (batch, length, thinker, capture, key),
                     lambda: ThinkerDecoding(model.thinker, batch, length, thinker, capture))
    first, prompt_embeds, prompt_hidden = t.prefill(inputs, model.config.talker_config.accept_hidden_layer)
    with _Experts(model, steps):
        text = t.decoder.run(first, prompt_ids=ids, penalty_ignore=left_padding(mask))
    made = talker_inputs(model, ids, mask, text.tokens, prompt_embeds, prompt_hidden, speaker_id,
                         thinker.eos_token_ids)
    length = bucket(made["mask"].shape[1] + talker.max_new_tokens)
    text_len = bucket(made["trailing"].shape[1] + 1)
    k = sessions.get("talker", (batch, length, text_len, talker, capture, key),
                     lambda: TalkerDecoding(model.talker, batch, length, text_len, talker, capture))
    first = k.prefill(made, inputs["feature_attention_mask"].sum(-1))
    with _Experts(model, steps):
        # generate's talker input_ids are empty (no prompt to penalise), but its penalty still skips as many
        # leading columns as the talker mask has padding: here those are generated tokens
        codec = k.decoder.run(first, penalty_ignore=left_padding(made["mask"]))
    codes = k.codes[:, : codec.length - 1].transpose(1, 2).clone()  # [B, groups, m - 1]
    return Generated(text.tokens, codec.tokens, codes, {"thinker": text.info, "talker": codec.info})
