"""``KimiAudioAdapter``: Kimi-Audio's shared/text decoder and MIMO (audio) decoder gates, and EVC
through ``kimia_infer``'s own ``KimiAudio.generate``.

Hook points (``act_fn`` outputs, ``[batch, pos, d_mlp]``; paths relative to ``adapter.model``, an
``nn.Module`` whose only child is the wrapper's ``alm``):

- ``lm.layers.{l}.mlp.gate``    -> ``alm.model.layers.{l}.mlp.act_fn`` (28 x 18944 in 7B). Layers
  ``0..b`` feed both heads, later layers only the text head; ``b`` =
  ``config.kimia_mimo_transformer_from_layer_index`` (21) is in each hook point's ``meta``.
- ``synth.layers.{l}.mlp.gate`` -> ``alm.model.mimo_layers.{l}.mlp.act_fn`` (6 x 18944), which branch off
  the hidden state after main layer ``b`` and produce the audio-token logits.

``KimiAudio.generate`` runs one conversation at a time with batch 1 (``batched = False``): no padding,
every position recorded is real. The text stream and the audio stream are fed at the same positions, so
``lm`` and ``synth`` see the same number of positions; after the text ends, the text stream is fed blanks.

Around each ``generate`` call the adapter adds what kimia_infer lacks (verified against its source, see
docs/adapters/kimi_audio.md): length caps and the 1500-step budget on the two heads, a cast of the bf16
Whisper features for an ALM in another dtype, and an empty waveform for zero speech tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import re
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esn.adapters import (
    CONVERSION_SYSTEM_PROMPT,
    EVCRequest,
    EVCResult,
    GenerationConfig,
    ModelAdapter,
    check_dtype,
    parse_options,
)
from esn.errors import EsnError
from esn.hookpoints import HookPoint
from esn.loading import require_remote_code, seeded
from esn.requirements import Requirement, ensure, install_line

if TYPE_CHECKING:  # torch loads with the model: `esn adapters list` imports this module
    from torch import nn

LM_LAYERS = "alm.model.layers"
SYNTH_LAYERS = "alm.model.mimo_layers"
KIMIA_MODULE = "kimia_infer.api.kimia"
STANDIN_PREFIX = "esn_kimi_audio.standin."
STANDIN_MARKER = "esn_standin.json"
KIMI_GIT = "git+https://github.com/MoonshotAI/Kimi-Audio.git"
# What kimia_infer (MoonshotAI/Kimi-Audio) and the checkpoint's ALM code run on; where each bound comes
# from: docs/adapters/kimi_audio.md. The install extra esn-kimi-audio[model] pins the PyPI part.
REQUIREMENTS = (
    Requirement("torch", install="torch==2.4.1", why="kimia_infer's requirements.txt pins 2.4.1; flash-attn is built against it"),
    Requirement("torchaudio", install="torchaudio==2.4.1", why="kimia_infer's requirements.txt; must match torch"),
    Requirement("transformers", ">=4.37,<5", install="transformers==4.51.3",
                why="the ALM imports Qwen2 (4.37+) and passes position_ids to apply_rotary_pos_emb as a 5th "
                    "positional argument, removed in 5.0; Moonshot's Evalkit installs 4.51.3"),
    Requirement("flash-attn", module="flash_attn", pip_options="--no-build-isolation",
                why="the ALM raises at import without it (CUDA build)"),
    Requirement("kimi-audio", module="kimia_infer", install=KIMI_GIT,
                why="the KimiAudio wrapper (prompt manager, Whisper, GLM-4-Voice tokenizer, detokenizer); not on PyPI"),
)
# The tiny stand-in (esn_standin.json) is written for the test machine's transformers.
STANDIN_REQUIREMENTS = (Requirement("transformers", ">=4.56", why="the stand-in loads its ALM with dtype=..."),)
WRITTEN_FOR = "kimia_infer at github.com/MoonshotAI/Kimi-Audio (torch 2.4.1, transformers 4.x, CUDA, flash-attn)"
INSTALL = install_line(REQUIREMENTS)
# KimiAudio.generate(output_type="both") runs at most 12.5 * 120 steps minus the prompt length (120 s).
STEP_BUDGET = 1500
SYSTEM_PROMPTS = {"conversion": CONVERSION_SYSTEM_PROMPT}
# GenerationConfig.options and their deterministic defaults (temperature <= 1e-6 is argmax in kimia_infer).
OPTIONS: dict[str, tuple[type, Any]] = {
    "audio_temperature": (float, 0.0),
    "text_temperature": (float, 0.0),
    "audio_top_k": (int, 5),
    "text_top_k": (int, 5),
    "audio_repetition_penalty": (float, 1.0),
    "text_repetition_penalty": (float, 1.0),
}


class NoAudioWarning(UserWarning):
    """A conversion produced no speech; its result has an empty waveform and ``info['error']``."""


class BudgetWarning(UserWarning):
    """``max_audio_tokens`` is more than kimia_infer's 120 s step budget leaves after the prompt."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EsnError(f"{path}: unreadable JSON ({exc})") from None


def cuda_device(device: str, *, cpu_ok: bool) -> int | None:
    """The CUDA index for ``device`` ("cuda" = the current device, "cuda:N"), None for an allowed "cpu".

    kimia_infer puts everything on ``torch.cuda.current_device()``, so the adapter sets that device; the
    published code cannot run on CPU (only the stand-in can).
    """
    import torch

    text = str(device).strip().lower()
    if text == "cpu":
        if cpu_ok:
            return None
        raise EsnError("kimia_infer runs Kimi-Audio on CUDA only (it puts everything on torch.cuda.current_device()); "
                       "got device='cpu'. Use device='cuda' or 'cuda:N'")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise EsnError(f"device {device!r} is not 'cuda' or 'cuda:N'" + (" or 'cpu'" if cpu_ok else ""))
    if not torch.cuda.is_available():
        raise EsnError(f"device {device!r}, but CUDA is not available here (torch {torch.__version__})")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if match.group(1) is None else int(match.group(1))
    if index >= count:
        raise EsnError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return index


@contextlib.contextmanager
def empty_audio_passthrough(kimia: Any, info: dict) -> Iterator[None]:
    """kimia_infer hands zero speech tokens to its detokenizer too, whose vocoder then fails (its first
    convolution cannot run on zero frames). For the duration of the block, zero tokens give an empty
    waveform ``[1, 0]`` instead; ``info["audio_tokens"]`` records the count either way."""
    import torch

    own = vars(kimia).get("detokenize_audio")
    real = kimia.detokenize_audio

    def detokenize_audio(tokens: Any) -> Any:  # tokens [1, n] speech ids, offset removed
        info["audio_tokens"] = int(tokens.shape[-1])
        return torch.zeros(1, 0) if tokens.numel() == 0 else real(tokens)

    kimia.detokenize_audio = detokenize_audio
    try:
        yield
    finally:
        if own is None:
            del kimia.detokenize_audio
        else:
            kimia.detokenize_audio = own


class KimiAudioAdapter(ModelAdapter):
    """Kimi-Audio through ``kimia_infer``: ``lm`` = shared/text decoder gates, ``synth`` = MIMO audio-decoder gates; one conversation at a time."""
    name = "kimi_audio"
    architectures = ("MoonshotKimiaForCausalLM",)
    model_name = "Kimi-Audio"
    description = "Kimi-Audio (kimia_infer): shared/text decoder gates (lm) and MIMO audio-decoder gates (synth)"
    batched = False
    sample_rate = 24_000
    requirements = REQUIREMENTS
    needs_cuda = True
    remote_code = True

    def __init__(self, model: Any, source: str | Path):
        super().__init__(model, source)
        self.kimia = model.kimia

    # -- loading -----------------------------------------------------------------------------------
    @classmethod
    def kimia_module(cls, source: str | Path) -> str:
        """``kimia_infer.api.kimia``, or the stand-in module a tiny checkpoint names."""
        path = Path(source)
        if not path.is_dir():
            if path.exists():
                raise EsnError(f"model {str(source)!r} is a file; give the checkpoint directory")
            return KIMIA_MODULE  # a hub id: kimia_infer downloads it
        if not (path / "config.json").is_file():
            raise EsnError(f"{source}: no config.json; not a Kimi-Audio checkpoint directory")
        cls.check_architectures(_read_json(path / "config.json"), source)
        marker = path / STANDIN_MARKER
        if not marker.is_file():
            return KIMIA_MODULE
        module = str(_read_json(marker).get("kimia_module", ""))
        if not module.startswith(STANDIN_PREFIX):
            raise EsnError(f"{marker}: kimia_module {module!r} is not a stand-in of this package ({STANDIN_PREFIX}*)")
        return module

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
    ) -> KimiAudioAdapter:
        require_remote_code(trust_remote_code, f"Kimi-Audio's model class is Python code shipped inside its "
                            f"checkpoint ({source}/modeling_moonshot_kimia.py), which kimia_infer loads with "
                            "trust_remote_code")
        check_dtype(dtype)
        if attn_implementation:
            raise EsnError("kimia_infer chooses its own attention (flash-attn); leave attn_implementation unset")
        module_name = cls.kimia_module(source)
        real = module_name == KIMIA_MODULE
        index = cuda_device(device, cpu_ok=not real)
        ensure(REQUIREMENTS if real else STANDIN_REQUIREMENTS, "Kimi-Audio's kimia_infer" if real else "the Kimi-Audio stand-in")
        import torch

        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise EsnError(
                f"Kimi-Audio needs its inference package kimia_infer, which is not on PyPI and could not be "
                f"imported ({exc}). Install it with: {INSTALL}"
            ) from None
        if index is not None:
            torch.cuda.set_device(index)  # kimia_infer places everything on the current device
        try:
            kimia = module.KimiAudio(model_path=str(source), load_detokenizer=True)
        except Exception as exc:  # its stack fails in many ways on other versions; say why once
            raise EsnError(
                f"could not load Kimi-Audio from {source}: {type(exc).__name__}: {exc}. The adapter was written "
                f"against {WRITTEN_FOR} (you have torch {torch.__version__}); install with: {INSTALL}"
            ) from exc
        if dtype != "auto":
            kimia.alm.to(getattr(torch, dtype))
        kimia.alm.eval()
        from esn_kimi_audio.module import KimiModule

        return cls(KimiModule(kimia), source)

    @classmethod
    def write_tiny(cls, directory: str | Path, *, seed: int = 0) -> Path:
        from esn_kimi_audio.tiny import write_tiny

        return write_tiny(directory, seed=seed)

    # -- hook points -------------------------------------------------------------------------------
    @property
    def branch_layer(self) -> int:
        """The main layer whose output the MIMO (audio) layers start from."""
        return int(self.kimia.alm.config.kimia_mimo_transformer_from_layer_index)

    def hook_points(self) -> list[HookPoint]:
        from esn.hooks import gate_hook_points

        b = self.branch_layer
        lm = [
            dataclasses.replace(hp, meta={"mimo_branch_after_layer": b, "feeds": "text+audio" if hp.layer <= b else "text"})
            for hp in gate_hook_points(self.model, LM_LAYERS, "lm")
        ]
        synth = [
            dataclasses.replace(hp, meta={"mimo_branch_after_layer": b, "feeds": "audio"})
            for hp in gate_hook_points(self.model, SYNTH_LAYERS, "synth")
        ]
        return lm + synth

    # stream_specs(): {} — batch 1, so every position is real.

    # -- generation --------------------------------------------------------------------------------
    def _options(self, options: dict[str, Any]) -> dict[str, Any]:
        given = parse_options(self.name, options, {key: kind for key, (kind, _) in OPTIONS.items()})
        for key, value in given.items():
            if value < 0:
                raise EsnError(f"{self.name} option {key} must be >= 0, got {options[key]!r}")
        return {key: default for key, (_, default) in OPTIONS.items()} | given

    def chats(self, request: EVCRequest, config: GenerationConfig, audio_path: str) -> list[dict]:
        """User turn: [system text], the instruction, then the audio (a file path). Kimi has no system role.

        The audio comes last on purpose: kimia_infer adds the speech-continuation token
        ``<|im_kimia_speech_ctd_id|>`` (output_type "both") only after an audio message that ends the user turn.
        """
        turn = []
        if config.system_prompt is not None:
            system = SYSTEM_PROMPTS.get(config.system_prompt, config.system_prompt)
            turn.append({"role": "user", "message_type": "text", "content": system})
        turn.append({"role": "user", "message_type": "text", "content": self.instruction(request, config)})
        turn.append({"role": "user", "message_type": "audio", "content": audio_path})
        return turn

    def _limits(self, config: GenerationConfig, info: dict, request_id: str) -> tuple[list[tuple[nn.Module, Any]], dict]:
        """Forward hooks on the two heads for one ``KimiAudio.generate`` call, and their step counts.

        Each head runs once per step (batch 1; step 0 is the prefill, last position last). Step 0 gives the
        prompt length P and so the step budget ``1500 - P`` that "both" mode allows (120 s, prompt included).
        From step ``max_new_tokens`` the text end token, and from step ``delay + max_audio_tokens`` (audio lags
        text by ``delay`` steps) the audio end token ``<|im_msg_end|>`` is made the only choice: "both" mode
        has no length argument and greedy audio can loop. The heads are hooked, not ``alm``: the decode loop
        calls ``alm.forward`` directly, which skips hooks on ``alm`` itself.
        """
        x = self.kimia.extra_tokens
        alm = self.kimia.alm
        delay = int(self.kimia.kimia_text_audiodelaytokens)
        steps = {"text": 0, "audio": 0}

        def only(logits: Any, token: int) -> Any:  # logits [1, pos, vocab]
            logits = logits.clone()
            logits[:, -1, :] = float("-inf")
            logits[:, -1, token] = 0.0
            return logits

        def text_head(module, args, logits):
            i = steps["text"]
            steps["text"] += 1
            if i < config.max_new_tokens:
                return None
            info.setdefault("text_capped_at_step", i)
            return only(logits, x.kimia_text_eos)

        def audio_head(module, args, logits):
            i = steps["audio"]
            steps["audio"] += 1
            if i == 0:
                info["prompt_positions"] = int(logits.shape[1])
                info["step_budget"] = budget = STEP_BUDGET - int(logits.shape[1])
                if config.max_audio_tokens > budget - delay:
                    warnings.warn(
                        f"{self.name}: request {request_id or '?'}: max_audio_tokens={config.max_audio_tokens} is more than "
                        f"kimia_infer's 120 s budget leaves after this {logits.shape[1]}-position prompt: at most "
                        f"{max(budget - delay, 0)} audio tokens", BudgetWarning, stacklevel=2)
            if i < delay + config.max_audio_tokens:
                return None
            info.setdefault("audio_capped_at_step", i)
            return only(logits, x.msg_end)

        return [(alm.lm_head, text_head), (alm.mimo_output, audio_head)], steps

    def _feature_cast(self) -> list[tuple[nn.Module, Any]]:
        """A pre-hook casting the Whisper features to the ALM's dtype before ``vq_adaptor``.

        kimia_infer's Whisper encoder runs in bf16 and its features reach ``vq_adaptor`` uncast, so an ALM in
        any other dtype would fail on the first audio forward.
        """
        adaptor = getattr(self.kimia.alm.model, "vq_adaptor", None)
        if adaptor is None:
            return []
        dtype = next(adaptor.parameters()).dtype

        def cast(module, args):  # args[0]: features [1, pos, kimia_adaptor_input_dim]
            if args and args[0].dtype != dtype:
                return (args[0].to(dtype), *args[1:])
            return None

        return [(adaptor, cast)]

    def generate(self, requests: Sequence[EVCRequest], config: GenerationConfig) -> list[EVCResult]:
        """Each request through ``KimiAudio.generate(output_type="both")`` in turn, greedy by default
        (temperature 0 for text and audio, repetition penalty 1.0), seeded with ``config.seed`` (the
        detokenizer starts from noise)."""
        if config.speaker is not None:
            raise EsnError(f"{self.name} has no speaker choice: Kimi-Audio speaks in its one voice (got speaker={config.speaker!r})")
        options = self._options(config.options)
        return [self._convert(request, config, options) for request in requests]

    def _convert(self, request: EVCRequest, config: GenerationConfig, options: dict) -> EVCResult:
        import numpy as np
        import soundfile as sf
        from esn.hooks import installed

        info: dict[str, Any] = {"seed": config.seed}
        limits, steps = self._limits(config, info, request.id)
        with tempfile.TemporaryDirectory(prefix="esn-kimia-") as tmp:
            path = Path(tmp) / "input.wav"
            sf.write(str(path), request.audio, 16_000, subtype="FLOAT")  # kimia_infer reads audio from a path
            with installed(limits), installed(self._feature_cast(), kind="pre"), \
                    empty_audio_passthrough(self.kimia, info), seeded(config.seed, self.device):
                try:
                    wav, text = self.kimia.generate(self.chats(request, config, str(path)), output_type="both", **options)
                except EsnError:
                    raise
                except Exception as exc:
                    import torch
                    import transformers

                    raise EsnError(
                        f"Kimi-Audio generate failed on request {request.id or '?'}: {type(exc).__name__}: {exc}. The "
                        f"adapter was written against {WRITTEN_FOR} (you have torch {torch.__version__}, transformers "
                        f"{transformers.__version__})"
                    ) from exc
        text = " ".join(str(text or "").split())
        budget = info.get("step_budget")
        if "audio_capped_at_step" in info:
            info["audio_stopped_by"] = "max_audio_tokens"
        elif budget is not None and steps["audio"] >= budget:
            info["audio_stopped_by"] = "120 s budget"
        elif steps["audio"]:
            info["audio_stopped_by"] = "end token"
        if wav is None or wav.numel() == 0:
            info["error"] = ("the prompt fills kimia_infer's whole 1500-step (120 s) budget, so nothing was generated; "
                             "use shorter input audio" if not steps["audio"] else
                             "Kimi-Audio produced no audio tokens before its end token")
            warnings.warn(f"{self.name}: request {request.id or '?'}: {info['error']}", NoAudioWarning, stacklevel=3)
            return EVCResult(request.id, text, np.zeros(0, np.float32), self.sample_rate, info)
        wave = wav.detach().float().cpu().reshape(-1).numpy()
        info["audio_seconds"] = round(len(wave) / self.sample_rate, 3)
        return EVCResult(request.id, text, wave, self.sample_rate, info)
