"""``Qwen3OmniAdapter``: Qwen3-Omni's mixture-of-experts thinker and talker, and EVC generation.

Hook points (``act_fn`` outputs; ``esn.hooks.mlp_hook_points``), for Qwen3-Omni-30B-A3B:

- ``lm.layers.{l}.mlp.gate`` -> ``thinker.model.language_model.layers.{l}.mlp.experts.act_fn``: routed,
  128 experts x 768 units, top 8, 48 layers (a dense layer, if a checkpoint has one, is a dense hook point);
- ``synth.layers.{l}.mlp.gate`` -> ``talker.model.layers.{l}.mlp.experts.act_fn``: routed, 128 x 384, top 6,
  layers 0-19; ``synth.layers.{l}.mlp.shared_expert.gate`` -> its shared expert (768 units, every position);
- ``synth.layers.{20 + l}.mlp.gate`` -> ``talker.code_predictor.model.layers.{l}.mlp.act_fn`` (dense, 3072
  units, 5 layers): the code predictor continues the talker's depth, once per talker step.

Streams for recording: the thinker gets ``input_ids``/``attention_mask`` on every text step; the talker
gets ``inputs_embeds`` in its prefill (with the mask when a row is padded) and the fed codec id after;
the code predictor is a substep of the talker (``esn.substeps``): it runs inside each talker decode step.

Decoding: ``decode="graph"`` (the default on CUDA) runs thinker and talker through ``esn.decode``
(``esn_qwen3_omni.decode``: static steps over the same modules, the code predictor unrolled inside the
talker's step, each step captured once as a CUDA graph); ``decode="generate"`` (the default elsewhere)
through transformers' ``generate``. Both give the same text, codes and audio.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from esn.adapters import (
    CONVERSION_SYSTEM_PROMPT,
    EVCRequest,
    EVCResult,
    GenerationConfig,
    ModelAdapter,
    StreamSpec,
    check_dtype,
    parse_options,
)
from esn.decode.policy import GraphDecoding, decode_mode, greedy_generate_options
from esn.errors import EsnError
from esn.hookpoints import HookPoint
from esn.hub import read_checkpoint_config
from esn.loading import place, placement, quiet_transformers, seeded, torch_dtype
from esn.requirements import Requirement

THINKER_LAYERS = "thinker.model.language_model.layers"
TALKER_LAYERS = "talker.model.layers"
CODE_PREDICTOR = "talker.code_predictor"
CODE_PREDICTOR_LAYERS = "talker.code_predictor.model.layers"
DEFAULT_SPEAKER = "Ethan"
IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")  # experts implementations esn can follow

# Settings a user may pass in GenerationConfig.options, with their types.
OPTIONS: dict[str, Any] = {
    "thinker_min_new_tokens": int,  # force text length (benchmarks)
    "talker_min_new_tokens": int,  # default 1: code2wav needs at least one code
    "talker_repetition_penalty": float,  # Qwen's default 1.05 (deterministic with greedy decoding)
    "experts_implementation": str,  # grouped_mm (default) | batched_mm | eager, for this call
    # "graph": thinker and talker through esn.decode (CUDA graphs on CUDA, the same steps eagerly on
    # CPU); "generate": transformers' generate. Default: graph on CUDA (generate if the decode steps would
    # run the eager experts implementation, which cannot be captured), generate elsewhere.
    "decode": str,
    "decode_experts": str,  # decode="graph": experts implementation of the decode steps (default: the call's)
}
SYSTEM_PROMPTS = {"conversion": CONVERSION_SYSTEM_PROMPT}


class _Code2WavCatcher:
    """Stands in for ``model.code2wav`` during ``generate``: keeps the codes ``[B, groups, n]``, decodes
    nothing. transformers decodes a batch in one pass; the adapter decodes each row alone afterwards, so
    a row's audio equals its solo run bit for bit (batched convolutions round differently)."""

    def __init__(self, real: Any):
        self.real = real
        self.codes = None
        self.chunking = (300, 25)

    @property
    def total_upsample(self):
        return self.real.total_upsample

    def chunked_decode(self, codes, chunk_size: int = 300, left_context_size: int = 25):
        import torch

        self.codes = codes
        self.chunking = (chunk_size, left_context_size)
        return torch.zeros((codes.shape[0], 1, codes.shape[-1] * int(self.real.total_upsample)), device=codes.device)


@contextlib.contextmanager
def _caught(model: Any):
    """``model.code2wav`` replaced by a catcher, ``model.talker.generate`` wrapped to keep its sequences."""
    catcher, sequences = _Code2WavCatcher(model.code2wav), []
    original = model._modules.pop("code2wav")
    object.__setattr__(model, "code2wav", catcher)
    talker_generate = model.talker.generate

    def generate(*args, **kwargs):
        out = talker_generate(*args, **kwargs)
        sequences.append(out.sequences)
        return out

    model.talker.__dict__["generate"] = generate
    try:
        yield catcher, sequences
    finally:
        del model.talker.__dict__["generate"]
        object.__delattr__(model, "code2wav")
        model._modules["code2wav"] = original


def system_prompt(value: str | None) -> str:
    """``None`` -> the conversion prompt; a preset name (``conversion``) or literal text."""
    return CONVERSION_SYSTEM_PROMPT if value is None else SYSTEM_PROMPTS.get(value, value)


class Qwen3OmniAdapter(GraphDecoding, ModelAdapter):
    """Qwen3-Omni: ``lm`` = thinker routed-expert gates (a neuron is (expert, unit)), ``synth`` = talker
    routed and shared experts and the code predictor (a substep); batched greedy EVC, 24 kHz speech."""

    name = "qwen3_omni"
    architectures = ("Qwen3OmniMoeForConditionalGeneration",)
    model_name = "Qwen3-Omni"
    description = ("Qwen3-Omni (MoE): thinker routed-expert gates (lm), talker experts, shared experts and code "
                   "predictor gates (synth); transformers' native class")
    # What `esn adapters check qwen3_omni` reports (transformers' native class, as this adapter drives it).
    requirements = (
        Requirement("transformers", ">=5.24", why="the fused experts module (gate_up_proj [E, 2d, h]) whose rows "
                    "esn.routing maps back to positions, with experts_implementation; tested with 5.24"),
        Requirement("accelerate", optional=True, why="loads straight onto the GPU; without it, onto the CPU first"),
    )
    batched = True
    sample_rate = 24_000

    def __init__(self, model: Any, source: str | Path, tokenizer: Any, features: Any):
        super().__init__(model, source)
        from esn_qwen3_omni.prompt import PromptBuilder

        if not getattr(model, "has_talker", False):
            raise EsnError(f"{source}: the checkpoint has no talker (enable_audio_output is false, e.g. the "
                           "Thinking or Captioner model); EVC needs speech output: use Qwen3-Omni-30B-A3B-Instruct")
        self.tokenizer = tokenizer
        self.prompts = PromptBuilder(tokenizer, features, model.config)

    # -- loading -----------------------------------------------------------------------------------
    @classmethod
    def read_config(cls, source: str | Path) -> dict:
        """``config.json`` of a local checkpoint or hub id, read before any weight (architecture check)."""
        config = read_checkpoint_config(source, "Qwen/Qwen3-Omni-30B-A3B-Instruct")
        cls.check_architectures(config, source)
        return config

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,  # native class: nothing remote to trust
    ) -> Qwen3OmniAdapter:
        from transformers import AutoTokenizer, Qwen3OmniMoeForConditionalGeneration, WhisperFeatureExtractor

        from esn_qwen3_omni.checks import check_finite

        check_dtype(dtype)
        cls.read_config(source)
        source = str(source)
        try:  # quiet: config warnings about mrope keys and tiny vocabularies
            with quiet_transformers():
                model, info = Qwen3OmniMoeForConditionalGeneration.from_pretrained(
                    source, dtype=torch_dtype(dtype), attn_implementation=attn_implementation,
                    output_loading_info=True, **placement(device))
                tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left")
                features = WhisperFeatureExtractor.from_pretrained(source)
        except RuntimeError as exc:  # transformers' loading report: tensors missing or of another shape
            raise EsnError(f"cannot load Qwen3-Omni from {source}: weights are missing or of another shape than "
                           f"config.json says ({str(exc).splitlines()[0]})") from None
        except (OSError, ValueError, KeyError) as exc:
            raise EsnError(f"cannot load Qwen3-Omni from {source}: {type(exc).__name__}: {exc}") from None
        # transformers fills missing weights with random (talker experts: uninitialised) values and only
        # logs it: refuse instead
        bad = list(info.get("missing_keys", [])) + [str(k[0] if isinstance(k, tuple) else k)
                                                    for k in info.get("mismatched_keys", [])]
        if bad:
            raise EsnError(f"{source}: {len(bad)} weights are missing or of another shape (e.g. {', '.join(sorted(bad)[:3])}); "
                           "the weights do not match config.json")
        place(model, device)
        check_finite(model, source)
        return cls(model, source, tokenizer, features)

    @classmethod
    def write_tiny(cls, directory: str | Path, *, seed: int = 0) -> Path:
        from esn_qwen3_omni.tiny import write_tiny

        return write_tiny(directory, seed=seed)

    # -- hook points -------------------------------------------------------------------------------
    def hook_points(self) -> list[HookPoint]:
        from esn.hooks import mlp_hook_points

        talker = mlp_hook_points(self.model, TALKER_LAYERS, "synth")
        n_talker = len(self.model.get_submodule(TALKER_LAYERS))
        return (mlp_hook_points(self.model, THINKER_LAYERS, "lm") + talker
                + mlp_hook_points(self.model, CODE_PREDICTOR_LAYERS, "synth", first_layer=n_talker))

    @property
    def talker_stop_ids(self) -> tuple[int, ...]:
        """``codec_eos``: it ends speech, and rows that finished early are fed it (the talker's pad)."""
        return (int(self.model.config.talker_config.codec_eos_token_id),)

    def stream_specs(self) -> dict[str, StreamSpec]:
        return {
            "lm": StreamSpec(root="thinker", stop_token_ids=self.prompts.stop_ids),
            "synth": StreamSpec(root="talker", stop_token_ids=self.talker_stop_ids, substeps=(CODE_PREDICTOR,),
                                substep_positions=int(self.model.config.talker_config.num_code_groups)),
        }

    # -- generation --------------------------------------------------------------------------------
    @property
    def speakers(self) -> list[str]:
        """The voices of the talker (its config's ``speaker_id``), sorted."""
        return sorted(self.model.config.talker_config.speaker_id or {})

    def _options(self, options: dict[str, Any]) -> dict[str, Any]:
        out = {"talker_min_new_tokens": 1, **parse_options(self.name, options, OPTIONS)}
        impl = out.get("experts_implementation")
        if impl is not None and impl not in IMPLEMENTATIONS:
            raise EsnError(f"qwen3_omni option experts_implementation={impl!r} must be one of {', '.join(IMPLEMENTATIONS)}")
        return out

    def _decode_rows(self, codes: Any, sequences: Any, chunking: tuple[int, int]) -> tuple[list[Any], list[int]]:
        """code2wav on each row's own codes ``[B, groups, n]`` (one column per fed codec token), up to the
        row's first codec eos in ``sequences`` ``[B, >= n]`` (as transformers cuts them), each row alone.
        Returns the waveforms and each row's number of codes."""
        import torch

        n = codes.shape[-1]
        eos = (sequences[:, :n] == int(self.model.config.talker_config.codec_eos_token_id)).to(codes.device)
        positions = torch.arange(n, device=codes.device)
        lengths = torch.where(eos, positions, n).min(dim=-1).values.tolist()
        waves = []
        with torch.inference_mode():
            for row, length in enumerate(lengths):
                if length == 0:
                    waves.append(torch.zeros(0))
                    continue
                wave = self.model.code2wav.chunked_decode(codes[row:row + 1, :, :length], *chunking)
                waves.append(wave.reshape(-1).float())
        return waves, lengths

    def generate(self, requests: Sequence[EVCRequest], config: GenerationConfig) -> list[EVCResult]:
        """All requests as rows of one left-padded batch (transformers 5.24's Qwen3-Omni generates batches;
        finished rows are fed the codec eos), through ``esn.decode`` (option ``decode="graph"``, the default
        on CUDA) or transformers' ``generate`` (``"generate"``); both give the same tokens and codes. Text,
        codec and residual codes are greedy, so the result does not depend on the seed; the global RNG is
        forked and seeded anyway. code2wav then decodes each row alone (bit-identical to the row's solo run;
        transformers' one batched pass rounds differently)."""
        if not requests:
            return []
        speaker = (config.speaker or DEFAULT_SPEAKER).lower()
        if speaker not in self.speakers:
            raise EsnError(f"unknown speaker {config.speaker!r} for {self.source}; available: {', '.join(self.speakers)}")
        options = self._options(config.options)
        impl = options.pop("experts_implementation", None)
        decode_experts = options.pop("decode_experts", None)
        if decode_experts is not None and decode_experts not in IMPLEMENTATIONS:
            raise EsnError(f"qwen3_omni option decode_experts={decode_experts!r} must be one of {', '.join(IMPLEMENTATIONS)}")
        device = self.device
        # default: graph on CUDA, unless the decode steps would run the eager experts (not capturable)
        steps_impl = decode_experts or impl
        eager_steps = (steps_impl == "eager" if steps_impl
                       else "eager" in self.model.get_experts_implementation().values())
        decode = decode_mode(self.name, options.pop("decode", None), device, capturable=not eager_steps)
        batch = self.prompts.batch([r.audio for r in requests], system_prompt(config.system_prompt),
                                   [self.instruction(r, config) for r in requests], [r.id for r in requests])
        inputs = {k: v.to(device) for k, v in batch.tensors.items()}
        inputs["input_features"] = inputs["input_features"].to(self.model.thinker.dtype)
        before = self.model.get_experts_implementation() if impl else None
        try:
            if impl:
                self.model.set_experts_implementation(impl)
            with seeded(config.seed, device):
                if decode == "generate":
                    text, tokens, codes, chunking = self._generate_transformers(inputs, config, options, speaker)
                else:
                    text, tokens, codes, chunking = self._generate_graph(inputs, config, options, speaker, decode_experts)
            waves, lengths = self._decode_rows(codes, tokens, chunking)
        finally:
            if before is not None:
                self.model.set_experts_implementation(before)
        text = text.cpu()
        results = []
        for i, request in enumerate(requests):
            words, n_text = self.prompts.decode(text[i].tolist())
            wave = waves[i].detach().float().cpu().numpy().reshape(-1)
            n_codes = lengths[i]
            info: dict[str, Any] = {"prompt_tokens": batch.prompt_lengths[i], "text_tokens": n_text,
                                    "audio_samples": int(wave.size), "audio_tokens": n_codes,
                                    "audio_codes": codes[i, :, :n_codes].tolist(),  # [groups][n]
                                    "speaker": speaker, "decode": decode}
            if wave.size == 0:
                info["error"] = "the talker produced no speech codes"
                warnings.warn(f"request {request.id or i}: Qwen3-Omni produced no audio", stacklevel=2)
            results.append(EVCResult(id=request.id, text=words, waveform=wave, sample_rate=self.sample_rate, info=info))
        return results

    def _generate_transformers(self, inputs: dict, config: GenerationConfig, options: dict, speaker: str) -> tuple:
        """transformers' generate: text ``[B, n]``, codec tokens ``[B, m]``, codes ``[B, groups, m']``, chunking."""
        talker = self.model.config.talker_config
        with warnings.catch_warnings(), _caught(self.model) as (catcher, seqs):
            # repetition_penalty with inputs_embeds only warns that the prompt is not penalised
            warnings.filterwarnings("ignore", message=".*repetition_penalty.*")
            sequences, _ = self.model.generate(
                **inputs,
                speaker=speaker,
                **greedy_generate_options("thinker", config.max_new_tokens, self.prompts.stop_ids, self.prompts.pad),
                **greedy_generate_options("talker", config.max_audio_tokens, pad_token_id=int(talker.codec_eos_token_id),
                                          unset_sampling=True),
                **options,
            )
        if catcher.codes is None:
            raise EsnError(f"{self.source}: generate produced no speech codes (talker did not run)")
        return sequences[:, inputs["input_ids"].shape[1]:], seqs[-1], catcher.codes, catcher.chunking

    def _generate_graph(self, inputs: dict, config: GenerationConfig, options: dict, speaker: str,
                        chosen: str | None) -> tuple:
        """esn.decode: what ``_generate_transformers`` returns, each decode step one CUDA-graph replay (on CUDA)."""
        from esn.decode import Greedy

        from esn_qwen3_omni.decode import CODE2WAV_CHUNKING, generate_codes

        model = self.model
        talker = model.config.talker_config
        gc = model.thinker.generation_config
        thinker = Greedy(
            config.max_new_tokens,
            tuple(self.prompts.stop_ids),
            int(self.prompts.pad),
            min_new_tokens=options.get("thinker_min_new_tokens", 0),
            repetition_penalty=float(gc.repetition_penalty or 1.0),
            suppress_token_ids=tuple(int(i) for i in gc.suppress_tokens or ()),
        )
        vocab = int(talker.text_config.vocab_size)
        eos = int(talker.codec_eos_token_id)
        codec = Greedy(
            config.max_audio_tokens,
            (eos,),
            eos,  # rows that finished are fed the codec eos, as the eager path's talker_pad_token_id
            min_new_tokens=options["talker_min_new_tokens"],
            repetition_penalty=options.get("talker_repetition_penalty", 1.05),  # Qwen's generate default
            # generate suppresses the last 1024 ids (the specials) but codec eos
            suppress_token_ids=tuple(i for i in range(max(vocab - 1024, 0), vocab) if i != eos),
        )
        out = generate_codes(model, self._sessions, inputs, speaker_id=int(talker.speaker_id[speaker]),
                             thinker=thinker, talker=codec, capture=self.capture, experts=chosen)
        self.last_decode_info = out.info
        return out.text, out.tokens, out.codes, CODE2WAV_CHUNKING
