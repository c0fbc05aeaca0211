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
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
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

if TYPE_CHECKING:  # torch loads with the model: `esn adapters list` imports this module
    from torch import nn

LM_LAYERS = "alm.model.layers"
SYNTH_LAYERS = "alm.model.mimo_layers"
KIMIA_MODULE = "kimia_infer.api.kimia"
STANDIN_PREFIX = "esn_kimi_audio.standin."
STANDIN_MARKER = "esn_standin.json"
WRITTEN_FOR = "kimia_infer at github.com/MoonshotAI/Kimi-Audio (torch 2.4.1, CUDA, flash-attn)"
INSTALL = (
    "pip install torch==2.4.1 torchaudio==2.4.1 && pip install flash-attn --no-build-isolation && "
    "pip install git+https://github.com/MoonshotAI/Kimi-Audio.git"
)
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


@contextlib.contextmanager
def seeded(seed: int, device: Any) -> Iterator[None]:
    """Run under ``torch.manual_seed(seed)`` and restore the caller's RNG state afterwards."""
    import torch

    cuda = [device] if getattr(device, "type", "cpu") == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EsnError(f"{path}: unreadable JSON ({exc})") from None


class KimiAudioAdapter(ModelAdapter):
    """Kimi-Audio through ``kimia_infer``: ``lm`` = shared/text decoder gates, ``synth`` = MIMO audio-decoder gates; one conversation at a time."""
    name = "kimi_audio"
    architectures = ("MoonshotKimiaForCausalLM",)
    model_name = "Kimi-Audio"
    description = "Kimi-Audio (kimia_infer): shared/text decoder gates (lm) and MIMO audio-decoder gates (synth)"
    batched = False
    sample_rate = 24_000

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
        if not trust_remote_code:
            raise EsnError(
                f"Kimi-Audio's model class is Python code shipped inside its checkpoint ({source}/"
                "modeling_moonshot_kimia.py), which kimia_infer loads with trust_remote_code; esn runs such code "
                "only when you opt in: pass trust_remote_code=True (command line: --trust-remote-code)"
            )
        check_dtype(dtype)
        if attn_implementation:
            raise EsnError("kimia_infer chooses its own attention (flash-attn); leave attn_implementation unset")
        module_name = cls.kimia_module(source)
        import torch

        real = module_name == KIMIA_MODULE
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise EsnError(
                f"Kimi-Audio needs its inference package kimia_infer, which is not on PyPI and could not be "
                f"imported ({exc}). Install it with: {INSTALL}"
            ) from None
        if real:
            if not torch.cuda.is_available():
                raise EsnError("kimia_infer runs Kimi-Audio on CUDA only (it calls torch.cuda.current_device())")
            if device.startswith("cuda"):
                torch.cuda.set_device(torch.device(device))  # kimia_infer places everything on the current device
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
        """User turn: [system text], the audio (a file path), the instruction. Kimi has no system role."""
        turn = []
        if config.system_prompt is not None:
            system = SYSTEM_PROMPTS.get(config.system_prompt, config.system_prompt)
            turn.append({"role": "user", "message_type": "text", "content": system})
        turn.append({"role": "user", "message_type": "audio", "content": audio_path})
        turn.append({"role": "user", "message_type": "text", "content": self.instruction(request, config)})
        return turn

    def _length_caps(self, config: GenerationConfig, fired: dict) -> list[tuple[nn.Module, Any]]:
        """Forward hooks on the two heads that end the text after ``max_new_tokens`` steps and the audio
        after ``max_audio_tokens`` tokens, by making the end token the only choice.

        ``KimiAudio.generate`` has no length argument in "both" mode (it allows 120 s) and greedy audio
        decoding can loop. The heads are hooked, not ``alm``: the decode loop calls ``alm.forward``
        directly, which skips hooks on ``alm`` itself. Each head runs once per step, last position last.
        """
        x = self.kimia.extra_tokens
        alm = self.kimia.alm
        audio_stop = int(self.kimia.kimia_text_audiodelaytokens) + config.max_audio_tokens

        def cap(limit: int, token: int, key: str):
            step = {"i": 0}

            def hook(module, args, logits):  # logits [1, pos, vocab]
                i = step["i"]
                step["i"] += 1
                if i < limit:
                    return None
                fired.setdefault(key, i)
                logits = logits.clone()
                logits[:, -1, :] = float("-inf")
                logits[:, -1, token] = 0.0
                return logits

            return hook

        return [
            (alm.lm_head, cap(config.max_new_tokens, x.kimia_text_eos, "text_capped_at_step")),
            (alm.mimo_output, cap(audio_stop, x.msg_end, "audio_capped_at_step")),
        ]

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
        with tempfile.TemporaryDirectory(prefix="esn-kimia-") as tmp:
            path = Path(tmp) / "input.wav"
            sf.write(str(path), request.audio, 16_000, subtype="FLOAT")  # kimia_infer reads audio from a path
            with installed(self._length_caps(config, info)), seeded(config.seed, self.device):
                wav, text = self.kimia.generate(self.chats(request, config, str(path)), output_type="both", **options)
        text = " ".join(str(text or "").split())
        if wav is None or wav.numel() == 0:
            info["error"] = "Kimi-Audio produced no audio tokens before its end token"
            warnings.warn(f"{self.name}: request {request.id or '?'}: {info['error']}", NoAudioWarning, stacklevel=3)
            return EVCResult(request.id, text, np.zeros(0, np.float32), self.sample_rate, info)
        wave = wav.detach().float().cpu().reshape(-1).numpy()
        info["audio_seconds"] = round(len(wave) / self.sample_rate, 3)
        return EVCResult(request.id, text, wave, self.sample_rate, info)
