"""The model-adapter interface: everything the engine needs to know about one LALM family.

An adapter is a small table of module paths (its hook points) plus a generate function. It is a
class registered through the ``register_adapters`` hook; ``esn adapters list`` reads only class
attributes, so listing never imports the model's heavy packages.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from esn.emotions import EMOTIONS, normalize_emotion
from esn.errors import EsnError
from esn.hookpoints import STREAMS, HookPoint, Layout
from esn.requirements import Requirement

DEFAULT_INSTRUCTION = (
    "Convert the emotion of this speech to {emotion}. Say exactly the same words as the input speech, "
    "in the same language, with a clearly {emotion} voice."
)


DTYPES = ("auto", "float32", "bfloat16", "float16")  # what every adapter's load(dtype=...) accepts


def check_dtype(dtype: str) -> str:
    """``dtype`` if it is one of ``DTYPES`` (the torch dtype is ``getattr(torch, dtype)``), else EsnError."""
    if dtype not in DTYPES:
        raise EsnError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return dtype


_FLAG_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def flag(value: Any) -> bool:
    """A boolean option: a bool, 0/1, or true/false/yes/no/on/off in any case (TOML, JSON, CLI).

    ``bool`` itself would read the string ``"false"`` as True.
    """
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _FLAG_WORDS:
        return _FLAG_WORDS[value.strip().lower()]
    raise ValueError(value)


def parse_options(adapter: str, options: Mapping[str, Any], kinds: Mapping[str, Callable[[Any], Any]]) -> dict[str, Any]:
    """``GenerationConfig.options`` checked against an adapter's ``kinds`` ``{key: converter}``, converted.

    An unknown key or a value its converter (``int``, ``float``, ``flag``, ...) rejects is an EsnError
    naming the adapter, the key and the expected kind. Defaults and range checks stay with the adapter.
    """
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key not in kinds:
            raise EsnError(f"unknown {adapter} option {key!r}; known: {', '.join(kinds)}")
        kind = kinds[key]
        try:
            out[key] = kind(value)
        except (TypeError, ValueError):
            expected = "true or false" if kind is flag else getattr(kind, "__name__", repr(kind))
            raise EsnError(f"{adapter} option {key}={value!r} must be {expected}") from None
    return out


# The paper's setting: a fixed, emotion-agnostic system prompt asking for conversion with the words kept
# (the paper gives no verbatim text; this is our wording of its description). Adapters offer it as the
# "conversion" preset of ``GenerationConfig.system_prompt``.
CONVERSION_SYSTEM_PROMPT = (
    "You are an emotional voice conversion system. You receive a speech recording and an instruction "
    "naming a target emotion. Say exactly the same words as the recording, in the same language, and "
    "express the requested emotion through your voice."
)


class GenerationConfig(BaseModel):
    """How an EVC conversion is generated. Adapter defaults apply where a field is None."""

    model_config = ConfigDict(extra="forbid")

    system_prompt: str | None = None
    instruction: str = DEFAULT_INSTRUCTION
    max_new_tokens: int = Field(256, ge=1, description="text tokens (language-model stream)")
    max_audio_tokens: int = Field(1024, ge=1, description="speech tokens (synthesis stream)")
    seed: int = 0
    speaker: str | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="adapter-specific settings")


@dataclass
class EVCRequest:
    """One conversion attempt: neutral source speech and the emotion to convert it to.

    - ``audio``: the source speech, float32 mono ``[samples]`` at **16 kHz** (``esn.audio.MODEL_RATE``,
      what the models' audio encoders take). ``esn.audio.prepare_audio`` turns any file or array, any
      rate and channel count, into that; a request does not resample.
    - ``emotion``: the target, one of ``esn.emotions.EMOTIONS`` (normalised: ``"Happy"`` -> ``"happy"``).
    - ``id``: the attempt's name, returned in ``EVCResult.id``.
    - ``transcript``: the reference words, for WER; never shown to the model, except by an adapter with
      ``speaks_given_words = True`` (a model that speaks the words it is given): there it is the input.
    """

    audio: np.ndarray  # float32 mono waveform at 16 kHz, [samples]
    emotion: str
    id: str = ""
    transcript: str | None = None  # the reference words; the input only with speaks_given_words

    def __post_init__(self) -> None:
        self.emotion = normalize_emotion(self.emotion, EMOTIONS)
        audio = np.asarray(self.audio)
        if audio.ndim != 1 or audio.size == 0:
            raise EsnError(f"request {self.id or '?'}: audio must be a non-empty mono array, got shape {audio.shape}")
        self.audio = audio.astype(np.float32, copy=False)


@dataclass
class EVCResult:
    """What a conversion produced: the model's decoded text and its speech.

    - ``id``: the request's ``id``.
    - ``text``: the decoded text, special tokens stripped (compared with the transcript for WER).
    - ``waveform``: float32 mono ``[samples]`` at ``sample_rate``; empty (size 0) when the model produced
      no speech, with the reason in ``info["error"]``.
    - ``sample_rate``: the adapter's ``sample_rate`` (24 kHz for the shipped adapters).
    - ``info``: adapter extras: token counts, timings, warnings.
    """

    id: str
    text: str  # decoded text, special tokens stripped
    waveform: np.ndarray  # float32 [samples]; empty if the model produced no audio
    sample_rate: int
    info: dict[str, Any] = field(default_factory=dict)  # token counts, timings, warnings


@dataclass(frozen=True)
class StreamSpec:
    """How to tell real positions from padding in one stream, for recording.

    ``root`` is the module whose forward receives ``input_ids`` and ``attention_mask`` for every step of
    this stream. In a prefill call, positions where ``attention_mask`` is 0 are padding. In a decode call
    a row that has already fed one of ``stop_token_ids`` is finished (a solo run would have stopped).
    ``substeps`` are modules run inside each decode step of the root, before its forward, on that step's
    token (Qwen3-Omni's code predictor): their positions are real exactly when the root's step is
    (``esn.substeps``). ``substep_positions`` is how many positions they run per root decode step
    (Qwen3-Omni: 16, a 2-position prefill and 14 steps): the recorder's decode buffers hold a whole step's
    substep positions, so its chunk length is sized with it.
    """

    root: str
    stop_token_ids: tuple[int, ...] = ()
    substeps: tuple[str, ...] = ()
    substep_positions: int = 1

    def __post_init__(self) -> None:
        n = self.substep_positions
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise EsnError(f"StreamSpec({self.root!r}): substep_positions must be a positive integer, got {n!r}")

    def substep_of(self, module: str) -> str | None:
        """The substep whose module holds ``module`` (a hook point's path), or None."""
        return next((s for s in self.substeps if module.startswith(s + ".")), None)


class ModelAdapter(abc.ABC):
    """Base class of every adapter. Subclasses set the class attributes and implement the methods.

    Class attributes (read without loading a model: ``esn adapters list``, ``esn.testing.check_class``):

    - ``name``: the short id used on the command line and in configs, a Python identifier (``qwen_omni``).
    - ``architectures``: the config.json ``architectures`` strings this adapter loads.
    - ``streams``: the streams it exposes hook points for, a non-empty subset of ``("lm", "synth")``
      (default both); ``hook_points()`` must return exactly these streams.
    - ``description``, ``model_name``: one line for listings; the family as people write it, for errors.
    - ``batched``: True if ``generate`` runs all its requests as rows of one padded batch (per-row
      steering needs it); False if it runs them one after another.
    - ``sample_rate``: the rate of the returned waveforms.
    - ``instruction_channel``, ``speaks_given_words``, ``text_out``: the EVC contract of a model that takes
      no instruction (reports say nothing was sent), speaks the transcript it is given, or writes no text
      (the success filter is then the judge alone, and the report says so).

    Instances come from ``load`` (the constructor is for ``load`` to call); methods to implement:
    ``load``, ``write_tiny``, ``hook_points``, ``generate`` and, for padded batches, ``stream_specs``.
    """

    name: ClassVar[str]  # short id used on the command line, e.g. "qwen_omni"
    architectures: ClassVar[tuple[str, ...]]  # config ``architectures`` strings this adapter loads
    streams: ClassVar[tuple[str, ...]] = STREAMS  # streams this family can have; a checkpoint's: checkpoint_streams
    description: ClassVar[str] = ""
    model_name: ClassVar[str] = ""  # the model family as people write it, for messages ("Qwen2.5-Omni")
    # True if generate() runs all its requests as rows of one batch (per-row conditions need this).
    batched: ClassVar[bool] = True
    sample_rate: ClassVar[int] = 24_000
    # What the real model needs beyond esn-core (``esn adapters check``; ``esn.requirements``): packages with
    # the version range its code works with, whether it runs on CUDA only, whether loading runs checkpoint code.
    requirements: ClassVar[tuple[Requirement, ...]] = ()
    needs_cuda: ClassVar[bool] = False
    remote_code: ClassVar[bool] = False
    # The EVC contract for models that differ from an instruction-following, text-writing LALM:
    # ``instruction_channel`` False: the model takes no instruction (the target emotion is recorded, never
    # sent; reports say nothing was sent). ``speaks_given_words`` True: the model is given the words to say,
    # ``EVCRequest.transcript`` (it is the input, not only the WER reference). ``text_out`` False: the
    # model writes no text (``EVCResult.text`` is not its output), so the success filter checks content by
    # ASR or not at all (judge only), and says which in the report.
    instruction_channel: ClassVar[bool] = True
    speaks_given_words: ClassVar[bool] = False
    text_out: ClassVar[bool] = True

    def __init__(self, model: Any, source: str | Path):
        """Wrap a loaded model. ``model`` is an ``nn.Module`` whose submodules the hook points' dotted
        paths name (wrap a non-module model in one that holds it as a child); ``source`` is where it was
        loaded from (folder or hub id), kept for messages. Subclasses that need more (a tokenizer,
        speakers) take it as further arguments and call ``super().__init__(model, source)``."""
        self.model = model
        self.source = str(source)
        self._layout: Layout | None = None

    # -- loading -----------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def load(
        cls,
        source: str | Path,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
    ) -> ModelAdapter:
        """Load a checkpoint from a local directory or hub id."""

    @classmethod
    def check_architectures(cls, config: dict, source: str | Path) -> list[str]:
        """The checkpoint config's ``architectures``; EsnError unless one is what this adapter loads."""
        archs = list(config.get("architectures") or [])
        if not set(archs) & set(cls.architectures):
            raise EsnError(
                f"{source}: config.json architectures {archs} are not {cls.model_name or cls.name} "
                f"(adapter {cls.name!r} loads {list(cls.architectures)}); pick the adapter for this model "
                "(`esn adapters list`)"
            )
        return archs

    @classmethod
    @abc.abstractmethod
    def write_tiny(cls, directory: str | Path, *, seed: int = 0) -> Path:
        """Write a tiny random checkpoint that ``load`` reads (tests, demo, adapter authors)."""

    # -- hook points -------------------------------------------------------------------------------
    @abc.abstractmethod
    def hook_points(self) -> list[HookPoint]:
        """Every instrumented gate, ``lm`` first then ``synth``, in layer order."""

    def layout(self, streams: Sequence[str] | None = None) -> Layout:
        """This loaded checkpoint's hook points (of ``streams``): an instance-level layout, so two
        checkpoints of one family may differ (dense or mixture-of-experts layers, a missing talker)."""
        if self._layout is None:
            self._layout = Layout(self.hook_points())
        missing = sorted((set(streams or ()) & set(STREAMS)) - set(self._layout.streams))
        if missing:
            raise EsnError(f"{self.source}: this checkpoint has no {' or '.join(missing)} stream (it has "
                           f"{', '.join(self._layout.streams)})")
        return self._layout.select(streams)

    @property
    def checkpoint_streams(self) -> tuple[str, ...]:
        """The streams of this loaded checkpoint (a subset of the family's class-level ``streams``)."""
        return tuple(self.layout().streams)

    def module(self, hook_point: HookPoint | str) -> Any:
        """The ``act_fn`` module of a hook point; its output is the gate ``[batch, pos, d_mlp]``."""
        hp = self.layout()[hook_point] if isinstance(hook_point, str) else hook_point
        return self.model.get_submodule(hp.module)

    def stream_specs(self) -> dict[str, StreamSpec]:
        """Per stream, how recording tells padding from real positions (empty: count every position)."""
        return {}

    def envoy(self, traced: Any, hook_point: HookPoint | str) -> Any:
        """The nnsight envoy of a hook point's ``act_fn`` inside a trace of ``nnsight.NNsight(self.model)``."""
        hp = self.layout()[hook_point] if isinstance(hook_point, str) else hook_point
        node = traced
        for part in hp.module.split("."):
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        return node

    @property
    def architecture(self) -> str:
        """The loaded model's architecture: the first of its config's ``architectures``, else its class name."""
        config = getattr(self.model, "config", None)
        archs = getattr(config, "architectures", None) or [type(self.model).__name__]
        return str(archs[0])

    @property
    def device(self) -> Any:
        """The device of the model's first parameter (``cpu`` for a model without parameters)."""
        import torch

        try:
            return next(self.model.parameters()).device
        except (StopIteration, AttributeError):
            return torch.device("cpu")

    # -- generation --------------------------------------------------------------------------------
    @abc.abstractmethod
    def generate(self, requests: Sequence[EVCRequest], config: GenerationConfig) -> list[EVCResult]:
        """Convert each request; with ``batched`` all requests are rows of one batch, in order."""

    def instruction(self, request: EVCRequest, config: GenerationConfig) -> str:
        """The user instruction of one request: ``config.instruction`` with its ``{emotion}`` filled in."""
        return config.instruction.format(emotion=request.emotion)

    def prompt_texts(self, config: GenerationConfig) -> dict[str, str | None]:
        """The system prompt and instruction template sent for ``config``, for reports. The base class
        knows only the config: ``system_prompt`` None there means the adapter's own default, which
        adapters override this to spell out."""
        return {"system_prompt": config.system_prompt, "instruction": config.instruction}
