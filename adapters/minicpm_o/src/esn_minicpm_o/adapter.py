"""``MiniCPMOAdapter``: MiniCPM-o 4.5's LLM and TTS MLP gates, and EVC through its own ``chat``.

Hook points (``act_fn`` outputs, ``[batch, pos, d_mlp]``):

- ``lm.layers.{l}.mlp.gate``    -> ``llm.model.layers.{l}.mlp.act_fn`` (Qwen3ForCausalLM; 36 x 12288 in 4.5)
- ``synth.layers.{l}.mlp.gate`` -> ``tts.model.layers.{l}.mlp.act_fn`` (LlamaModel; read from ``tts_config``)

The checkpoint's own remote code (``modeling_minicpmo.py``) builds the model, so loading needs
``trust_remote_code=True``; it runs only on the stack it was written for (``REQUIREMENTS``, checked before
anything loads). A hub id is downloaded first, so that every path the remote code builds from
``config._name_or_path`` (the CosyVoice2 vocoder under ``assets/``) is a local one. ``chat`` runs one conversation at a time (``batched = False``): there is
no padding, and recording counts every position the model runs. The LLM's text is greedy
(``do_sample=False, num_beams=1``); the TTS always samples (``torch.multinomial``), so each conversion
runs under a fixed seed and the audio is reproducible only on the same software and hardware.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import tempfile
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
    check_dtype,
    flag,
    parse_options,
)
from esn.errors import EsnError
from esn.hookpoints import HookPoint
from esn.hub import is_hub_id, read_checkpoint_config
from esn.loading import require_remote_code, seeded
from esn.requirements import Requirement, ensure, install_line

LM_LAYERS = "llm.model.layers"
SYNTH_LAYERS = "tts.model.layers"
# What the published remote code (OpenBMB/minicpm-o-4_5-pytorch-simple-demo, MiniCPMO45/) runs on; see
# docs/adapters/minicpm_o.md for where each bound comes from. The install extra esn-minicpm-o[model] pins these.
REQUIREMENTS = (
    Requirement("transformers", ">=4.51.0,<4.53", install="transformers==4.51.0",
                why="remote code: Qwen3 (4.51+) and past_key_values.seen_tokens (removed in 4.54); "
                    "minicpmo-utils[tts] pins <4.53; upstream pins 4.51.0"),
    # lower bounds: esn-minicpm-o's own torch floor; the cosyvoice-minicpmo release read; upstream's Pillow floor
    Requirement("torch", ">=2.4,<=2.8.0", why="upstream README: torch<=2.8.0 (its requirements.txt pins 2.8.0)"),
    Requirement("torchaudio", ">=2.4,<=2.8.0", why="upstream README: torchaudio<=2.8.0 (the CosyVoice2 vocoder uses it)"),
    Requirement("cosyvoice-minicpmo", ">=0.1.0", module="cosyvoice",
                why="init_tts() imports cosyvoice.cli.cosyvoice.CosyVoice2 (minicpmo-utils 1.0.1-1.0.4 shipped it too)"),
    Requirement("pillow", ">=11.0", module="PIL", why="chat() imports PIL; upstream requirements.txt: Pillow>=11.0.0"),
)
# The tiny stand-in (esn_standin.json in the checkpoint) is written for the test machine's transformers.
STANDIN_REQUIREMENTS = (Requirement("transformers", ">=4.51", why="the stand-in builds a Qwen3ForCausalLM"),)
STANDIN_MARKER = "esn_standin.json"
WRITTEN_FOR = "transformers 4.51.0, torch <= 2.8.0"
INSTALL = install_line(REQUIREMENTS)
VOCODER = "assets/CosyVoice2-0.5B"  # init_tts()'s CosyVoice2 directory inside the checkpoint
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


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise EsnError(f"MiniCPM-o needs transformers ({exc}); install with: {INSTALL}") from None
    return transformers


class _Tee(io.TextIOBase):
    """Writes to the real stderr and keeps a copy: chat() prints the TTS errors it swallows."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def swallowed_error(printed: str) -> str | None:
    """The exception line (``Type: message``) of the last traceback in ``printed``, if there is one: the
    first unindented line after the traceback's ``File ...`` lines."""
    header = "Traceback (most recent call last):"
    if header not in printed:
        return None
    tail = printed.rsplit(header, 1)[1].splitlines()
    return next((line.strip() for line in tail if line.strip() and not line.startswith((" ", "\t"))), None)


def speech_path(model: Any, source: str | Path) -> str:
    """The vocoder call chat() will make, from the switches of the checkpoint's ``tts_config``.

    chat() catches every error of its speech step and only prints it, so a switch its code cannot follow
    would silently give every conversion no audio; those are refused here, before anything runs.
    """
    tts = model.tts
    config = tts.config
    condition = getattr(tts, "condition_type", getattr(config, "condition_type", None))
    if condition != "hidden_text_merge":
        raise EsnError(
            f"{source}: tts_config.condition_type is {condition!r}; MiniCPM-o's chat() builds speech only for "
            "'hidden_text_merge' (any other value raises NotImplementedError inside chat, which swallows it: "
            "no conversion would have audio)"
        )
    if getattr(config, "audio_tokenizer_type", None) != "s3tokenizer":
        raise EsnError(f"{source}: tts_config.audio_tokenizer_type is {config.audio_tokenizer_type!r} after "
                       "init_tts(); chat() makes speech only with 's3tokenizer'")
    if not hasattr(config, "s3_stream_generate"):
        raise EsnError(
            f"{source}: tts_config has no s3_stream_generate; chat() reads it for every conversion (an "
            "AttributeError it swallows: no audio). Use the checkpoint's own config.json"
        )
    if not config.s3_stream_generate:
        return "token2wav"
    missing = [k for k in ("s3_stream_n_timesteps", "s3_stream_chunk_size", "s3_stream_prelook_size") if not hasattr(config, k)]
    if missing or not hasattr(tts.audio_tokenizer, "inference_token2wav"):
        lacks = f"tts_config lacks {', '.join(missing)}" if missing else (
            f"the installed vocoder {type(tts.audio_tokenizer).__module__}.{type(tts.audio_tokenizer).__name__} "
            "has no inference_token2wav")
        raise EsnError(f"{source}: tts_config.s3_stream_generate is true, but {lacks}, which that speech path "
                       "needs; chat() would swallow the error and return no audio")
    return "inference_token2wav"


class MiniCPMOAdapter(ModelAdapter):
    """MiniCPM-o 4.5 (remote code): ``lm`` = LLM (Qwen3) gates, ``synth`` = TTS (Llama) gates; EVC through its ``chat()``, one conversation at a time."""
    name = "minicpm_o"
    architectures = ("MiniCPMO",)
    model_name = "MiniCPM-o"
    description = "MiniCPM-o 4.5 (remote code): llm gates (lm) and TTS LlamaModel gates (synth)"
    batched = False
    sample_rate = 24_000
    requirements = REQUIREMENTS
    remote_code = True

    def __init__(self, model: Any, source: str | Path):
        super().__init__(model, source)
        self.vocoder_call = speech_path(model, source)  # refuses TTS switches chat() cannot follow

    # -- loading -----------------------------------------------------------------------------------
    @classmethod
    def local_checkpoint(cls, source: str | Path) -> Path:
        """``source`` as a local directory: a hub id is downloaded (whole repository, ``assets/`` included).

        The remote code builds the vocoder path as ``config._name_or_path + "/assets/CosyVoice2-0.5B"``;
        loaded by hub id, that path is not a local directory and ``init_tts`` fails.
        """
        path = Path(source)
        if path.is_dir():
            return path
        if path.exists():
            raise EsnError(f"model {str(source)!r} is a file; give the checkpoint directory")
        if not is_hub_id(str(source)):
            raise EsnError(f"model {str(source)!r} not found: give a checkpoint directory or a hub id like openbmb/MiniCPM-o-4_5")
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo_id=str(source)))
        except Exception as exc:  # offline, no such repository, no access, no huggingface_hub
            raise EsnError(
                f"could not fetch {source} from the Hugging Face hub ({type(exc).__name__}: {exc}); download it "
                f"(`hf download {source} --local-dir DIR`) and give the directory"
            ) from None

    @classmethod
    def read_config(cls, source: str | Path) -> dict:
        """The checkpoint directory's config.json, checked to be MiniCPM-o."""
        config = read_checkpoint_config(source, "openbmb/MiniCPM-o-4_5")
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
        require_remote_code(trust_remote_code, "MiniCPM-o is built by Python code shipped inside its checkpoint "
                            f"({source}/modeling_minicpmo.py)")
        check_dtype(dtype)
        local = cls.local_checkpoint(source)
        cls.read_config(local)
        standin = (local / STANDIN_MARKER).is_file()
        ensure(STANDIN_REQUIREMENTS if standin else REQUIREMENTS,
               "the MiniCPM-o stand-in" if standin else "MiniCPM-o 4.5's remote code")
        transformers = _import_transformers()
        import torch

        new_api = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit()) >= (4, 56)
        kwargs: dict[str, Any] = {
            "trust_remote_code": True,
            ("dtype" if new_api else "torch_dtype"): dtype if dtype == "auto" else getattr(torch, dtype),
        }
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        versions = f"you have transformers {transformers.__version__}, torch {torch.__version__}"
        try:
            model = transformers.AutoModel.from_pretrained(str(local), **kwargs)
            model = model.eval().to(device)
        except Exception as exc:  # remote code on a mismatched stack fails in many ways; say why once
            raise EsnError(
                f"could not load MiniCPM-o from {source}: {type(exc).__name__}: {exc}. Its remote code was written "
                f"for {WRITTEN_FOR} ({versions}); install with: {INSTALL}"
            ) from exc
        for part in ("llm", "tts"):
            if not hasattr(model, part):
                raise EsnError(f"{source}: the loaded model has no {part!r} module; is init_tts false in its config?")
        vocoder = local / VOCODER
        if not vocoder.is_dir():
            raise EsnError(f"{source}: no {VOCODER}/ (the CosyVoice2 vocoder init_tts() loads); use the full checkpoint")
        try:
            model.init_tts(model_dir=str(vocoder))  # explicit: never a path built from a hub id
        except Exception as exc:
            raise EsnError(
                f"could not start MiniCPM-o's vocoder from {vocoder}: {type(exc).__name__}: {exc} ({versions}); "
                f"install with: {INSTALL}"
            ) from exc
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
            printed = _Tee(sys.stderr)
            with seeded(config.seed, self.device), contextlib.redirect_stderr(printed):
                try:
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
                except EsnError:
                    raise
                except Exception as exc:  # the remote code on another stack fails here, e.g. the cache API
                    import torch
                    import transformers

                    raise EsnError(
                        f"MiniCPM-o chat() failed on request {request.id or '?'}: {type(exc).__name__}: {exc}. Its "
                        f"remote code was written for {WRITTEN_FOR} (you have transformers {transformers.__version__}, "
                        f"torch {torch.__version__}); install with: {INSTALL}"
                    ) from exc
            info: dict[str, Any] = {"seed": config.seed, "tts_sampled": True, "vocoder_call": self.vocoder_call}
            swallowed = swallowed_error(printed.copy.getvalue())
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

            cause = (f"its chat() caught and printed {swallowed}" if swallowed else
                     "its chat() wrote no audio file and printed no error")
            info.setdefault(
                "error",
                f"MiniCPM-o produced no audio: {cause}. Common causes: the text hit max_new_tokens before "
                "<|tts_eos|>, or the vocoder (CosyVoice2) failed",
            )
            warnings.warn(f"{self.name}: request {request.id or '?'}: {info['error']}", NoAudioWarning, stacklevel=3)
            return EVCResult(request.id, clean_text(text), np.zeros(0, np.float32), self.sample_rate, info)
        if rate != self.sample_rate:
            info["resampled_from"] = int(rate)
            wave = resample(wave, int(rate), self.sample_rate)
        info["audio_seconds"] = round(len(wave) / self.sample_rate, 3)
        return EVCResult(request.id, clean_text(text), wave.astype("float32", copy=False), self.sample_rate, info)
