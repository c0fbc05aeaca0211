"""``MoshiAdapter``: Kyutai Moshi (transformers' ``MoshiForConditionalGeneration`` with the Mimi codec).

Hook points, the whole table (``hook_points`` builds them from the loaded config):

- ``lm.layers.{l}.mlp.gate``: the temporal transformer's MLP ``decoder.model.layers.{l}.mlp``
  (``MoshiGatingMLP``). ``fc1`` gives gate and up halves ``[batch, pos, 2d]`` in one projection and the
  MLP computes ``fc2(act(gate) * up)`` inside its forward: a *fused* hook point (``esn.fused``), the
  gate ``[batch, pos, d]`` seen at an injected identity module ``...mlp.esn_gate``; ``down_proj`` is ``fc2``.
- ``synth.layers.{l}.mlp.gate``: the depth decoder's MLP ``depth_decoder.layers.{l}.mlp``, one weight set
  per audio codebook (``MoshiFlexibleLinear`` ``[K, 2d, h]``), called as ``mlp(x, codebook_idx)``: an
  *indexed* (``esn.indexed``) and fused hook point of width ``K x d``; neuron ``(k, u)`` is unit ``u`` of
  codebook ``k``'s MLP. ``fc2``'s weight ``[K, h, d]`` folds per codebook.

Generation: the user's speech (16 kHz, resampled to Mimi's 24 kHz) is the user audio stream; Moshi's own
text and audio streams start empty (the unconditional ids) for as many frames, then Moshi answers for
``min(max_new_tokens, max_audio_tokens)`` frames (one text token and K audio codes per frame), greedily.
Moshi has no instruction channel: the request's target emotion is recorded in ``info`` and nothing is
sent (``instruction_channel = False``). Requests run one at a time (``batched = False``): transformers'
generate aligns the text, user and Moshi streams frame by frame with one delay pattern and one prompt
length for the whole batch (positions come from the cache length, not a mask), so rows of different
lengths cannot share a batch without changing what each row hears. Recording needs no stream spec: every position of every stream is real.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from esn.adapters import EVCRequest, EVCResult, GenerationConfig, ModelAdapter, check_dtype, parse_options
from esn.errors import EsnError
from esn.hookpoints import HookPoint
from esn.hub import read_checkpoint_config
from esn.requirements import Requirement

LM_LAYERS = "decoder.model.layers"  # temporal transformer: MoshiGatingMLP, fused fc1 [2d, h]
SYNTH_LAYERS = "depth_decoder.layers"  # depth decoder: MoshiGatingMLP over MoshiFlexibleLinear [K, 2d, h]
GATE = "esn_gate"  # the identity module esn injects into each MLP while it records or steers (esn.fused)
NO_INSTRUCTION = "(none: Moshi has no instruction channel; the target emotion is recorded, nothing is sent)"


class MoshiAdapter(ModelAdapter):
    """Moshi's temporal transformer (``lm``) and per-codebook depth decoder (``synth``), greedy speech replies."""

    name = "moshi"
    architectures = ("MoshiForConditionalGeneration",)
    model_name = "Moshi"
    description = "Kyutai Moshi (transformers): fused-gate temporal MLPs (lm), per-codebook depth decoder (synth)"
    batched = False  # one prompt length and delay pattern per generate call: see the module docstring
    sample_rate = 24_000
    instruction_channel: ClassVar[bool] = False  # nothing but speech goes in: the target emotion is not sent
    requirements = (
        Requirement("transformers", ">=5.24", why="MoshiForConditionalGeneration with the `cache` keyword and "
                    "MoshiFlexibleLinear called with codebook_idx (read against transformers 5.25)"),
        Requirement("tokenizers", ">=0.20", why="the text tokenizer"),
    )

    def __init__(self, model: Any, source: str | Path, tokenizer: Any):
        super().__init__(model, source)
        self.tokenizer = tokenizer

    # -- loading -----------------------------------------------------------------------------------
    @classmethod
    def load(cls, source: str | Path, *, dtype: str = "auto", device: str = "cpu",
             attn_implementation: str | None = None, trust_remote_code: bool = False) -> MoshiAdapter:
        import torch
        from transformers import AutoTokenizer, MoshiForConditionalGeneration
        from transformers.utils import logging as hf_logging

        check_dtype(dtype)
        cls.check_architectures(read_checkpoint_config(source, "kmhf/hf-moshiko"), source)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            model, info = MoshiForConditionalGeneration.from_pretrained(
                str(source), dtype=dtype if dtype == "auto" else getattr(torch, dtype),
                attn_implementation=attn_implementation, output_loading_info=True)
            tokenizer = AutoTokenizer.from_pretrained(str(source))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise EsnError(f"cannot load Moshi from {source}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        bad = [str(k[0] if isinstance(k, tuple) else k) for key in ("missing_keys", "mismatched_keys", "unexpected_keys")
               for k in info.get(key, [])]
        if bad:
            raise EsnError(f"{source}: {len(bad)} weights are missing, unexpected or of another shape (e.g. "
                           f"{', '.join(sorted(bad)[:3])}); the weights do not match config.json")
        model.to(device).eval()
        _check_finite(model, str(source))
        return cls(model, source, tokenizer)

    @classmethod
    def write_tiny(cls, directory: str | Path, *, seed: int = 0) -> Path:
        from esn_moshi.tiny import write_tiny

        return write_tiny(directory, seed=seed)

    # -- hook points -------------------------------------------------------------------------------
    def hook_points(self) -> list[HookPoint]:
        config = self.model.config
        depth = config.depth_decoder_config
        points = [HookPoint("lm", layer, config.ffn_dim // 2, f"{at}.{GATE}", f"{at}.fc2", fused=f"{at}.fc1",
                            activation=config.hidden_act) for layer, at in _mlps(self.model, LM_LAYERS)]
        k = int(depth.num_codebooks)
        points += [HookPoint("synth", layer, k * (depth.ffn_dim // 2), f"{at}.{GATE}", f"{at}.fc2", fused=f"{at}.fc1",
                             activation=depth.hidden_act, indices=k, index_from=at)
                   for layer, at in _mlps(self.model, SYNTH_LAYERS)]
        return points

    # -- generation --------------------------------------------------------------------------------
    def generate(self, requests: Sequence[EVCRequest], config: GenerationConfig) -> list[EVCResult]:
        parse_options(self.name, config.options, {})  # Moshi takes no options: an unknown key is an error
        frames = min(config.max_new_tokens, config.max_audio_tokens)
        return [self._one(request, frames, config.seed) for request in requests]

    def _one(self, request: EVCRequest, frames: int, seed: int) -> EVCResult:
        from esn.audio import MODEL_RATE, resample

        wave = resample(request.audio, MODEL_RATE, int(self.model.config.sampling_rate))
        text, audio, info = self.reply([wave], frames, seed)
        info.update(target_emotion=request.emotion, instruction=None, instruction_sent=False)
        return EVCResult(request.id, text[0], audio[0], self.sample_rate, info)

    def reply(self, waves: Sequence[np.ndarray], frames: int, seed: int = 0) -> tuple[list[str], list[np.ndarray], dict]:
        """Moshi's greedy reply to user speech (24 kHz, all of one length: one batch row each): texts,
        float32 waveforms and token counts. ``generate`` calls it with one wave at a time."""
        import torch

        if len({w.size for w in waves}) != 1:
            raise EsnError("Moshi's generate aligns all rows frame by frame: give waves of one length")
        model, cfg = self.model, self.model.config
        device = self.device
        user = torch.from_numpy(np.stack(waves))[:, None].to(device=device, dtype=model.dtype)  # [B, 1, samples]
        n = math.ceil(user.shape[-1] * cfg.audio_encoder_config.frame_rate / cfg.sampling_rate)  # prompt frames
        b = len(waves)
        text_ids = torch.full((b, n), cfg.vocab_size, dtype=torch.long, device=device)  # unconditional text
        moshi_codes = torch.full((b, cfg.num_codebooks, n), cfg.audio_vocab_size, dtype=torch.long, device=device)
        from transformers.utils import logging as hf_logging

        torch.manual_seed(seed)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # generate's notes on max_length beside max_new_tokens
        try:
            with torch.inference_mode():
                out = model.generate(input_ids=text_ids, user_input_values=user, moshi_audio_codes=moshi_codes,
                                     max_new_tokens=frames, min_new_tokens=frames, do_sample=False,
                                     depth_decoder_do_sample=False, return_audio_codes=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        new = out.sequences[:, n + 1:]  # after the prompt and the one unconditional frame generate puts first
        vocab = len(self.tokenizer)
        texts = [self.tokenizer.decode([t for t in row.tolist() if t < vocab], skip_special_tokens=True) for row in new]
        audio = [row[0].float().cpu().numpy().astype(np.float32) for row in out.audio_sequences]
        return texts, audio, {"prompt_frames": n, "text_tokens": int(new.shape[1]), "audio_frames": int(out.audio_codes.shape[-1])}

    def prompt_texts(self, config: GenerationConfig) -> dict[str, str | None]:
        """Nothing but speech is sent: neither a system prompt nor an instruction (reports say so)."""
        return {"system_prompt": NO_INSTRUCTION, "instruction": NO_INSTRUCTION, "instruction_channel": False}

    def instruction(self, request: EVCRequest, config: GenerationConfig) -> str:
        """Moshi gets no instruction; this is what reports show in its place."""
        return NO_INSTRUCTION


def _mlps(model: Any, layers_path: str) -> list[tuple[int, str]]:
    """``(layer, path of its MoshiGatingMLP)``, checked: fused fc1 of twice fc2's input width."""
    try:
        layers = model.get_submodule(layers_path)
    except AttributeError:
        raise EsnError(f"model {type(model).__name__} has no module {layers_path!r}") from None
    out = []
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not hasattr(mlp, "fc1") or not hasattr(mlp, "fc2") or not hasattr(mlp, "activation_fn"):
            raise EsnError(f"{layers_path}.{i} has no Moshi gating MLP (fc1, activation_fn, fc2)")
        out.append((i, f"{layers_path}.{i}.mlp"))
    return out


def _check_finite(model: Any, source: str) -> None:
    """EsnError naming the first parameters or buffers with NaN or inf values."""
    import torch

    with torch.no_grad():
        bad = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
               if t.dtype.is_floating_point and t.device.type != "meta" and not bool(torch.isfinite(t).all())]
    if bad:
        raise EsnError(f"{source}: {len(bad)} tensors hold NaN or inf values (e.g. {', '.join(bad[:3])}); "
                       "the checkpoint is damaged or was saved with uninitialised weights")
