"""``MiniCPMOAdapter``: MiniCPM-o 4.5's LLM and TTS MLP gates, and EVC through its own ``chat``.

Hook points (``act_fn`` outputs, ``[batch, pos, d_mlp]``):

- ``lm.layers.{l}.mlp.gate``    -> ``llm.model.layers.{l}.mlp.act_fn`` (Qwen3ForCausalLM; 36 x 12288 in 4.5)
- ``synth.layers.{l}.mlp.gate`` -> ``tts.model.layers.{l}.mlp.act_fn`` (LlamaModel; read from ``tts_config``)

The checkpoint's own remote code (``modeling_minicpmo.py``) builds the model, so loading needs
``trust_remote_code=True``. ``chat`` runs one conversation at a time (``batched = False``): there is
no padding, and recording counts every position the model runs. The LLM's text is greedy
(``do_sample=False, num_beams=1``); the TTS always samples (``torch.multinomial``), so each conversion
runs under a fixed seed and the audio is reproducible only on the same software and hardware.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from esn.adapters import (
    CONVERSION_SYSTEM_PROMPT,
    EVCRequest,
    EVCResult,
    GenerationConfig,
    ModelAdapter,
    check_dtype,
    flag,
    parse_options,
)
from esn.errors import EsnError
from esn.hookpoints import HookPoint

LM_LAYERS = "llm.model.layers"
SYNTH_LAYERS = "tts.model.layers"
# What the published remote code was written against (its config.json / requirements).
WRITTEN_FOR = "transformers 4.51.0, torch <= 2.8"
INSTALL = 'pip install "transformers==4.51.0" "torch<=2.8" "minicpmo-utils[all]"'
# MiniCPM-o's own default system prompt (``get_sys_prompt(mode="default")`` in its remote code).
MODEL_SYSTEM_PROMPT = "You are a helpful assistant. You can accept audio and text input and output voice and text."
SYSTEM_PROMPTS = {"model": MODEL_SYSTEM_PROMPT, "conversion": CONVERSION_SYSTEM_PROMPT}
# GenerationConfig.options this adapter understands.
OPTIONS: dict[str, type] = {
    "tts_temperature": float,  # TTS sampling temperature (model default 0.8); smaller is closer to greedy
    "enable_thinking": flag,  # Qwen3 thinking; off for EVC ("false" must read as False: not bool)
}
_SPECIAL = re.compile(r"<\|[^|>]*\|>|<think>.*?</think>|</?think>", re.S)


class NoAudioWarning(UserWarning):
    """A conversion produced text but no speech; its result has an empty waveform and ``info['error']``."""


def clean_text(text: str) -> str:
    """Drop special tokens and an empty thinking block from decoded text."""
    return " ".join(_SPECIAL.sub(" ", text or "").split())


@contextlib.contextmanager
def seeded(seed: int, device: Any) -> Iterator[None]:
    """Run under ``torch.manual_seed(seed)`` and restore the caller's RNG state afterwards."""
    import torch

    cuda = [device] if getattr(device, "type", "cpu") == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise EsnError(f"MiniCPM-o needs transformers ({exc}); install with: {INSTALL}") from None
    return transformers


def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return -1


class MiniCPMOAdapter(ModelAdapter):
    """MiniCPM-o 4.5 (remote code): ``lm`` = LLM (Qwen3) gates, ``synth`` = TTS (Llama) gates; EVC through its ``chat()``, one conversation at a time."""
    name = "minicpm_o"
    architectures = ("MiniCPMO",)
    model_name = "MiniCPM-o"
    description = "MiniCPM-o 4.5 (remote code): llm gates (lm) and TTS LlamaModel gates (synth)"
    batched = False
    sample_rate = 24_000

    # -- loading -----------------------------------------------------------------------------------
    @classmethod
    def read_config(cls, source: str | Path) -> dict:
        """The checkpoint's config.json (local directories only; hub ids are checked after download)."""
        path = Path(source)
        if not path.exists():
            return {}
        if not path.is_dir():
            raise EsnError(f"model {str(source)!r} is a file; give the checkpoint directory")
        try:
            config = json.loads((path / "config.json").read_text())
        except FileNotFoundError:
            raise EsnError(f"{source}: no config.json; not a MiniCPM-o checkpoint directory") from None
        except (OSError, ValueError) as exc:
            raise EsnError(f"{path / 'config.json'}: unreadable ({exc})") from None
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
        trust_remote_code: bool = False,
    ) -> MiniCPMOAdapter:
        if not trust_remote_code:
            raise EsnError(
                f"MiniCPM-o is built by Python code shipped inside its checkpoint ({source}/modeling_minicpmo.py), "
                "and esn runs such code only when you opt in: pass trust_remote_code=True "
                "(command line: --trust-remote-code) if you trust that checkpoint"
            )
        check_dtype(dtype)
        config = cls.read_config(source)
        transformers = _import_transformers()
        import torch

        written = config.get("transformers_version")
        if written and _major(written) != _major(transformers.__version__):
            warnings.warn(
                f"{source} was saved with transformers {written}; you have {transformers.__version__}. "
                f"If loading or chat fails, use the versions its code was written for: {INSTALL}",
                stacklevel=2,
            )
        new_api = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit()) >= (4, 56)
        kwargs: dict[str, Any] = {
            "trust_remote_code": True,
            ("dtype" if new_api else "torch_dtype"): dtype if dtype == "auto" else getattr(torch, dtype),
        }
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        try:
            model = transformers.AutoModel.from_pretrained(str(source), **kwargs)
            model = model.eval().to(device)
            model.init_tts()
        except Exception as exc:  # remote code on a mismatched stack fails in many ways; say why once
            raise EsnError(
                f"could not load MiniCPM-o from {source}: {type(exc).__name__}: {exc}. Its remote code was written "
                f"for {WRITTEN_FOR} (you have transformers {transformers.__version__}, torch {torch.__version__}); "
                f"install with: {INSTALL}"
            ) from exc
        for part in ("llm", "tts"):
            if not hasattr(model, part):
                raise EsnError(f"{source}: the loaded model has no {part!r} module; is init_tts false in its config?")
        return cls(model, source)

    @classmethod
    def write_tiny(cls, directory: str | Path, *, seed: int = 0) -> Path:
        from esn_minicpm_o.tiny import write_tiny

        return write_tiny(directory, seed=seed)

    # -- hook points -------------------------------------------------------------------------------
    def hook_points(self) -> list[HookPoint]:
        from esn.hooks import gate_hook_points

        return gate_hook_points(self.model, LM_LAYERS, "lm") + gate_hook_points(self.model, SYNTH_LAYERS, "synth")

    # stream_specs(): {} — one conversation per chat call, so every position is real.

    # -- generation --------------------------------------------------------------------------------
    def _options(self, options: dict[str, Any]) -> dict[str, Any]:
        out = parse_options(self.name, options, OPTIONS)
        if out.get("tts_temperature", 1.0) <= 0:
            raise EsnError(f"{self.name} option tts_temperature must be > 0 (the TTS always samples)")
        return out

    def _sampling_params(self, temperature: float | None) -> Any:
        """The remote code's own ``TTSSamplingParams`` with another temperature, or None for its default."""
        if temperature is None:
            return None
        import sys

        module = sys.modules.get(type(self.model).__module__)
        params_cls = getattr(module, "TTSSamplingParams", None)
        if params_cls is None:
            raise EsnError(f"{self.source}: this MiniCPM-o code has no TTSSamplingParams; drop tts_temperature")
        return params_cls(temperature=temperature)

    def messages(self, request: EVCRequest, config: GenerationConfig) -> list[dict]:
        """``[system, user(audio, instruction)]``; the first audio is also the TTS voice prompt."""
        system = SYSTEM_PROMPTS.get(config.system_prompt or "model", config.system_prompt)
        return [
            {"role": "system", "content": [system]},
            {"role": "user", "content": [request.audio, self.instruction(request, config)]},
        ]

    def generate(self, requests: Sequence[EVCRequest], config: GenerationConfig) -> list[EVCResult]:
        """Each request through ``model.chat`` in turn, seeded with ``config.seed``.

        ``config.max_audio_tokens`` is not used: MiniCPM-o's ``chat`` does not expose its TTS length (the
        TTS stops at its end token or after 2048 tokens).
        """
        if config.speaker is not None:
            raise EsnError(f"{self.name} has no speaker choice: its voice follows the input speech (got speaker={config.speaker!r})")
        options = self._options(config.options)
        params = self._sampling_params(options.get("tts_temperature"))
        return [self._convert(request, config, options, params) for request in requests]

    def _convert(self, request: EVCRequest, config: GenerationConfig, options: dict, params: Any) -> EVCResult:
        import soundfile as sf
        from esn.audio import resample

        extra = {"tts_sampling_params": params} if params is not None else {}
        with tempfile.TemporaryDirectory(prefix="esn-minicpmo-") as tmp:
            path = Path(tmp) / "out.wav"
            with seeded(config.seed, self.device):
                text = self.model.chat(
                    msgs=self.messages(request, config),
                    do_sample=False,
                    num_beams=1,
                    max_new_tokens=config.max_new_tokens,
                    use_tts_template=True,
                    enable_thinking=options.get("enable_thinking", False),
                    generate_audio=True,
                    output_audio_path=str(path),
                    **extra,
                )
            info: dict[str, Any] = {"seed": config.seed, "tts_sampled": True}
            wave, rate = None, self.sample_rate
            if path.is_file() and path.stat().st_size > 0:
                try:
                    wave, rate = sf.read(str(path), dtype="float32", always_2d=True)
                    wave = wave.mean(axis=1)
                except Exception as exc:  # a truncated file is a failed conversion, not a crash
                    info["error"] = f"MiniCPM-o wrote an unreadable audio file: {exc}"
                    wave = None
        if wave is not None and wave.size == 0:
            wave = None
        if wave is None:
            import numpy as np

            info.setdefault(
                "error",
                "MiniCPM-o produced no audio: its chat() catches TTS errors and only prints them (see the "
                "traceback above). Common causes: the text hit max_new_tokens before <|tts_eos|>, or the "
                "audio tokenizer (CosyVoice2) is missing",
            )
            warnings.warn(f"{self.name}: request {request.id or '?'}: {info['error']}", NoAudioWarning, stacklevel=3)
            return EVCResult(request.id, clean_text(text), np.zeros(0, np.float32), self.sample_rate, info)
        if rate != self.sample_rate:
            info["resampled_from"] = int(rate)
            wave = resample(wave, int(rate), self.sample_rate)
        info["audio_seconds"] = round(len(wave) / self.sample_rate, 3)
        return EVCResult(request.id, clean_text(text), wave.astype("float32", copy=False), self.sample_rate, info)
