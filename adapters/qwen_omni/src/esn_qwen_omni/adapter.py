"""``QwenOmniAdapter``: Qwen2.5-Omni's thinker LM and talker MLP gates, and EVC generation.

Hook points (``act_fn`` outputs, ``[batch, pos, d_mlp]``):

- ``lm.layers.{l}.mlp.gate``    -> ``thinker.model.language_model.layers.{l}.mlp.act_fn`` (28 x 18944 in 7B;
  older transformers: ``thinker.model.layers``). The vision tower's MLPs are not included.
- ``synth.layers.{l}.mlp.gate`` -> ``talker.model.layers.{l}.mlp.act_fn`` (24 x 18944 in 7B).

Streams for recording: the thinker's ``model`` (text decoder with audio encoder) gets ``input_ids``/
``attention_mask`` on every text step; the talker's forward gets ``attention_mask`` on every codec step
(``input_ids`` is None in its prefill, which runs on thinker embeddings; the mask still marks the left
padding) and the fed codec id after.

Decoding: ``decode="graph"`` (the default on CUDA) runs thinker and talker through ``esn.decode``
(``esn_qwen_omni.decode``: static steps over the same modules, each captured once as a CUDA graph);
``decode="generate"`` (the default elsewhere) through transformers' ``generate``. Both give the same tokens
(tested on CPU, where ``graph`` runs the same steps eagerly).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from esn.adapters import (
    EVCRequest,
    EVCResult,
    GenerationConfig,
    ModelAdapter,
    StreamSpec,
    check_dtype,
    flag,
    parse_options,
)
from esn.decode.policy import GraphDecoding, decode_mode, greedy_generate_options
from esn.errors import EsnError
from esn.hookpoints import HookPoint
from esn.hub import checkpoint_file, read_checkpoint_config
from esn.loading import place, placement, quiet_transformers, seeded, torch_dtype
from esn.requirements import Requirement

THINKER_LAYERS = ("thinker.model.language_model.layers", "thinker.model.layers")
TALKER_LAYERS = "talker.model.layers"
DEFAULT_SPEAKER = "Chelsie"
@contextlib.contextmanager
def _tf32(enabled: bool):
    """Let float32 matmuls use TF32 inside the block (CUDA only), restoring the caller's setting."""
    import torch

    if not enabled:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# Settings a user may pass in GenerationConfig.options, with their types; forwarded to model.generate.
OPTIONS: dict[str, Any] = {
    "thinker_min_new_tokens": int,  # force text length (benchmarks)
    "talker_min_new_tokens": int,  # default 1: token2wav needs at least one code
    "talker_repetition_penalty": float,  # Qwen's default 1.05 (still deterministic with greedy decoding)
    "token2wav_num_steps": int,  # ODE steps of the DiT (default 10)
    "token2wav_guidance_scale": float,
    # token2wav (DiT ODE and vocoder) decodes up to this many rows whose codes have the same length as
    # one batch (default 1 = row by row: a row's audio equals its solo run bit for bit). 16 gives 1.8x
    # the conversions/s at batch 16 (H200); each row keeps its solo noise, so the audio then differs
    # from row by row only by the rounding of batched kernels.
    "token2wav_batch": int,
    # Let token2wav's float32 matmuls use TF32 tensor cores (CUDA; convolutions already do by default
    # in PyTorch). The DiT is compute-bound in float32: much faster, audio differs by ~1e-3 relative.
    "token2wav_tf32": flag,
    # "float32" (default) or "bfloat16": run the DiT under bf16 autocast (the ODE state stays float32,
    # the vocoder float32). Faster again; its deviation is measured in docs/performance.md.
    "token2wav_dit_dtype": str,
    # CUDA: capture one DiT evaluation per group shape as a CUDA graph and replay it for the ODE's
    # evaluations (default true on CUDA). Same kernels, same audio; removes the launch overhead that
    # dominates small groups (batch 1).
    "token2wav_graph": flag,
    # "graph": thinker and talker through esn.decode (CUDA graphs on CUDA, the same steps eagerly on
    # CPU); "generate": transformers' generate. Default: graph on CUDA, generate elsewhere (esn.decode.policy).
    "decode": str,
}
DIT_GRAPHS = 2  # captured DiT evaluations kept (per group shape)
DIT_DTYPES = ("float32", "bfloat16")


class _CodeCatcher:
    """Stands in for ``model.token2wav`` during ``generate``: keeps each row's codes, decodes nothing.

    ``generate`` calls ``token2wav(code [1, n], conditioning [1, C], reference_mel [1, T, M], **kw)`` once
    per row and reads ``.dtype``; the adapter decodes the caught codes afterwards in length groups.
    """

    def __init__(self, real):
        self.real = real
        self.calls: list[tuple] = []

    @property
    def dtype(self):
        return self.real.dtype

    def float(self):
        self.real.float()
        return self

    def __call__(self, code, conditioning, reference_mel, **kwargs):
        import torch

        self.calls.append((code, conditioning, reference_mel, kwargs))
        return torch.zeros(0)


def _inference_mode(fn):
    """Run ``fn`` under ``torch.inference_mode`` (generate has its own no_grad; code after it does not)."""

    def wrapper(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _swapped(owner, name: str, replacement):
    """Temporarily replace ``owner.<name>`` (a submodule) with ``replacement`` (not a module)."""
    original = owner._modules[name]
    del owner._modules[name]
    object.__setattr__(owner, name, replacement)
    try:
        yield
    finally:
        object.__delattr__(owner, name)
        owner._modules[name] = original


def _restore_talker_mask(module, args, kwargs):
    """Give the talker the all-ones attention mask that ``generate`` dropped.

    transformers 5.x ``generate`` drops an attention mask that is all ones (no row padded: always at
    batch 1). Qwen2.5-Omni's talker then skips two things it only does with a mask: adding the codec
    pad/bos embeddings to its last two prompt positions, and TMRoPE positions. A padded batch keeps its
    mask, so without this hook a request converts differently alone than in a batch, and batch-1 speech
    lacks the conditioning the model was trained with.
    """
    import torch

    if kwargs.get("attention_mask") is not None:
        return None
    x = kwargs.get("inputs_embeds")
    x = x if x is not None else kwargs.get("input_ids")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = cache.get_seq_length() if cache is not None else 0
    kwargs["attention_mask"] = torch.ones((x.shape[0], past + x.shape[1]), dtype=torch.long, device=x.device)
    return args, kwargs


@contextlib.contextmanager
def _broadcast_block_mask(dit: Any):
    """Let every DiT layer build its block attention mask at ``[1, 1, frames, frames]``.

    transformers expands the block-distance matrix to ``[batch, heads, frames, frames]`` before each layer
    compares it with its look-ahead/back limits, so every layer materialises a full-size boolean mask (and
    attention a full-size bias from it): 134 MB per layer at 16 rows. The values do not depend on the
    batch or the head, and attention broadcasts the small mask to the same result.
    """
    original = getattr(dit, "_create_block_diff", None)
    if original is None:  # another transformers release: leave it alone
        yield
        return
    dit._create_block_diff = lambda hidden_states: original(hidden_states)[:1, :1]
    try:
        yield
    finally:
        del dit._create_block_diff


class _GraphedDiT:
    """One guided DiT evaluation at fixed shapes, captured as a CUDA graph and replayed per ODE evaluation.

    Small groups are launch-bound (a row's 36 evaluations issue ~40,000 kernels); replaying removes the
    host from the loop. Inputs are copied into static buffers, the output is cloned out (RK4 keeps four).
    """

    def __init__(self, dit: Any, speaker: Any, ref_mel: Any, code: Any, guided: bool, autocast: bool):
        import torch
        from esn.decode.capture import capture, warm_up

        self.dit, self.guided, self.autocast = dit, guided, autocast
        self.speaker, self.ref_mel, self.code = speaker.clone(), ref_mel.clone(), code.clone()
        self.x = torch.zeros(code.shape[0], code.shape[1] * dit.repeats, dit.mel_dim, device=code.device)
        self.t = torch.zeros((), device=code.device)
        warm_up(self._forward)
        self.graph, self.out = capture(self._forward, "a DiT evaluation", "something in the DiT synchronises")

    def _forward(self) -> Any:
        import torch

        # autocast's weight cache must stay off while capturing (torch's CUDA-graph notes)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if self.autocast else contextlib.nullcontext()
        with ctx, _broadcast_block_mask(self.dit):
            return _velocity(self.dit, self.t, self.x, self.speaker, self.ref_mel, self.code, self.guided)

    def set_inputs(self, speaker: Any, ref_mel: Any, code: Any) -> None:
        self.speaker.copy_(speaker)
        self.ref_mel.copy_(ref_mel)
        self.code.copy_(code)

    def __call__(self, t: Any, x: Any) -> Any:
        self.t.copy_(t)
        self.x.copy_(x)
        self.graph.replay()
        return self.out.clone()


def _velocity(dit: Any, t: Any, x: Any, speaker: Any, ref_mel: Any, code: Any, guided: bool) -> Any:
    """One DiT forward as ``dit.sample``'s ``ode_function`` calls it: both guidance halves (``[2G, frames, M]``)
    when ``guided``, else the conditioned one (``[G, frames, M]``)."""
    if not guided:
        return dit(hidden_states=x, speaker_embedding=speaker, condition_vector=ref_mel, quantized_code=code,
                   time_step=t, drop_audio_conditioning=False, drop_code=False, apply_cfg=False)
    return dit(hidden_states=x, quantized_code=code, speaker_embedding=speaker, condition_vector=ref_mel,
               time_step=t, apply_cfg=True)


def _dit_sample(
    dit: Any,
    cond: Any,
    ref_mel: Any,
    code: Any,
    seed: int,
    *,
    num_steps: int = 10,
    guidance_scale: float = 0.5,
    sway_coefficient: float | None = -1.0,
    graphs: dict | None = None,
    autocast: bool = False,
) -> Any:
    """``dit.sample`` for a batch whose every row starts from the noise of its solo run.

    transformers' ``sample`` draws one ``[G, frames, M]`` noise tensor, so a row's noise (and audio)
    would depend on its position in the batch. Here the noise is ``[1, frames, M]`` drawn right after
    ``torch.manual_seed(seed)``, exactly what a row-by-row call draws, shared by the rows. The rest is
    ``sample``'s ODE: RK4 over ``num_steps`` sway-shifted time points with classifier-free guidance.
    Shapes: ``cond`` ``[G, C]``, ``ref_mel`` ``[G, T, M]``, ``code`` ``[G, n]``; returns ``[G, M, frames]``.

    ``graphs`` (CUDA): a cache ``{shape key: _GraphedDiT}``; each evaluation is then a graph replay of the
    same kernels. ``autocast``: the DiT's forwards under bf16 autocast (the ODE state stays float32).
    """
    import torch
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import RungeKutta4ODESolver

    frames = code.shape[1] * dit.repeats
    if frames > dit.config.max_position_embeddings:
        raise EsnError(
            f"{code.shape[1]} codec tokens need {frames} mel frames; the DiT takes at most "
            f"{dit.config.max_position_embeddings} (lower max_audio_tokens)"
        )
    torch.manual_seed(seed)
    noise = torch.randn([1, frames, dit.mel_dim], dtype=ref_mel.dtype, device=code.device)
    noise = noise.expand(code.shape[0], -1, -1).contiguous()
    speaker = cond.unsqueeze(1).repeat(1, frames, 1)
    guided = guidance_scale >= 1e-5
    forward = None
    if graphs is not None and code.device.type == "cuda":
        key = (tuple(code.shape), tuple(ref_mel.shape), guided, autocast)
        forward = graphs.pop(key, None)  # re-inserted last: the cache keeps the most recent shapes
        if forward is None:
            try:
                forward = _GraphedDiT(dit, speaker, ref_mel, code, guided, autocast)
            except Exception as exc:  # a transformers change that syncs inside the DiT: decode eagerly
                import warnings

                warnings.warn(f"token2wav_graph: capturing the DiT failed ({type(exc).__name__}: {exc}); "
                              "running it eagerly", RuntimeWarning, stacklevel=2)
                forward = None
        else:
            forward.set_inputs(speaker, ref_mel, code)
        if forward is not None:
            graphs[key] = forward
            while len(graphs) > DIT_GRAPHS:
                graphs.pop(next(iter(graphs)))
    if forward is None:

        def forward(t, x):
            ctx = torch.autocast(code.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
            with ctx, _broadcast_block_mask(dit):
                return _velocity(dit, t, x, speaker, ref_mel, code, guided)

    def velocity(t, x):  # [G, frames, M]
        out = forward(t, x)
        if not guided:
            return out
        cond_out, null = torch.chunk(out, 2, dim=0)
        return cond_out + (cond_out - null) * guidance_scale

    t = torch.linspace(0, 1, num_steps, device=code.device, dtype=speaker.dtype)
    if sway_coefficient is not None:
        t += sway_coefficient * (torch.cos(torch.pi / 2 * t) - 1 + t)
    return RungeKutta4ODESolver(function=velocity, initial_value=noise).integrate(t)[-1].permute(0, 2, 1)


class QwenOmniAdapter(GraphDecoding, ModelAdapter):
    """Qwen2.5-Omni: ``lm`` = thinker decoder gates, ``synth`` = talker gates; batched greedy EVC, seeded token2wav."""
    name = "qwen_omni"
    # The released checkpoints' config.json says "Qwen2_5OmniModel" (the pre-release class name).
    architectures = ("Qwen2_5OmniForConditionalGeneration", "Qwen2_5OmniModel")
    model_name = "Qwen2.5-Omni"
    description = "Qwen2.5-Omni: thinker LM gates (lm) and talker gates (synth); transformers' native class"
    # What `esn adapters check qwen_omni` reports (transformers' native class, as this adapter drives it).
    requirements = (
        Requirement("transformers", ">=5.15", why="batched generation with audio output (5.13.1 and older raise); tested with 5.24"),
        Requirement("accelerate", optional=True, why="loads straight onto the GPU; without it, onto the CPU first"),
    )
    batched = True
    sample_rate = 24_000

    def __init__(self, model: Any, source: str | Path, tokenizer: Any, speakers: dict[str, dict] | None = None):
        super().__init__(model, source)
        from esn_qwen_omni.prompt import PromptBuilder

        if not getattr(model, "has_talker", False):
            raise EsnError(f"{source}: the checkpoint has no talker (enable_audio_output is false); EVC needs speech output")
        self.tokenizer = tokenizer
        self.prompts = PromptBuilder(tokenizer, model.config.thinker_config)
        self._dit_graphs: dict = {}  # token2wav_graph: captured DiT evaluations per group shape
        model.speaker_map.update(speakers or {})

    # -- loading -----------------------------------------------------------------------------------
    @classmethod
    def read_architectures(cls, source: str | Path) -> list[str]:
        """The checkpoint's config ``architectures`` (local folder or hub id), checked against this adapter's."""
        config = read_checkpoint_config(source, "Qwen/Qwen2.5-Omni-7B")
        return cls.check_architectures(config, source)

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,  # native class: nothing remote to trust
    ) -> QwenOmniAdapter:
        from transformers import AutoTokenizer, PreTrainedModel, Qwen2_5OmniForConditionalGeneration

        from esn_qwen_omni.speakers import SAFETENSORS_NAME, TORCH_NAME, load_speakers

        check_dtype(dtype)
        cls.read_architectures(source)
        source = str(source)
        speaker_file = checkpoint_file(source, SAFETENSORS_NAME) or checkpoint_file(source, TORCH_NAME)
        if speaker_file is None:
            raise EsnError(f"{source}: no speaker file ({SAFETENSORS_NAME} or {TORCH_NAME}); token2wav needs one")
        try:  # quiet: the talker config warns about thinker-vocabulary ids by design
            with quiet_transformers():
                # PreTrainedModel.from_pretrained, not the class's override: that one insists on spk_dict.pt.
                model = super(Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniForConditionalGeneration).from_pretrained(
                    source, dtype=torch_dtype(dtype), attn_implementation=attn_implementation, **placement(device))
                place(model, device)
                tokenizer = AutoTokenizer.from_pretrained(source)
        except OSError as exc:
            raise EsnError(f"cannot load Qwen2.5-Omni from {source}: {exc}") from None
        assert isinstance(model, PreTrainedModel)
        return cls(model, source, tokenizer, load_speakers(speaker_file))

    @classmethod
    def write_tiny(cls, directory: str | Path, *, seed: int = 0) -> Path:
        from esn_qwen_omni.tiny import write_tiny

        return write_tiny(directory, seed=seed)

    # -- hook points -------------------------------------------------------------------------------
    def _thinker_layers(self) -> str:
        for path in THINKER_LAYERS:
            try:
                self.model.get_submodule(path)
                return path
            except AttributeError:
                continue
        raise EsnError(f"{self.source}: no thinker decoder layers at {' or '.join(THINKER_LAYERS)}")

    def hook_points(self) -> list[HookPoint]:
        from esn.hooks import gate_hook_points

        return gate_hook_points(self.model, self._thinker_layers(), "lm") + gate_hook_points(
            self.model, TALKER_LAYERS, "synth"
        )

    @property
    def talker_stop_ids(self) -> tuple[int, ...]:
        """Codec ids that end speech: ``codec_pad`` (also what finished rows are fed) and ``codec_eos``."""
        talker = self.model.config.talker_config
        return (int(talker.tts_codec_pad_token_id), int(talker.tts_codec_end_token_id))

    def stream_specs(self) -> dict[str, StreamSpec]:
        return {
            "lm": StreamSpec(root="thinker.model", stop_token_ids=self.prompts.stop_ids),
            "synth": StreamSpec(root="talker", stop_token_ids=self.talker_stop_ids),
        }

    # -- generation --------------------------------------------------------------------------------
    @property
    def speakers(self) -> list[str]:
        """The voices this checkpoint can speak with (``GenerationConfig.speaker``)."""
        return sorted(self.model.speaker_map)

    def _options(self, options: dict[str, Any]) -> dict[str, Any]:
        return {"talker_min_new_tokens": 1, **parse_options(self.name, options, OPTIONS)}

    @staticmethod
    @_inference_mode
    def _decode_in_groups(
        token2wav: Any, calls: list[tuple], seed: int, max_rows: int, dit_dtype: str = "float32",
        graphs: dict | None = None,
    ) -> list[Any]:
        """token2wav over rows grouped by code length: DiT and vocoder batched, <= max_rows a batch.

        ``calls`` are ``(code [1, n], conditioning [1, C], reference_mel [1, T, M], kwargs)`` per row.
        Every row starts its ODE from the noise its solo run draws (seeded with ``seed``), so a row's
        audio does not depend on its batch mates beyond the rounding of batched kernels. With
        ``dit_dtype="bfloat16"`` the DiT's forwards run under bf16 autocast; with ``graphs`` (a cache,
        CUDA) each DiT evaluation is a CUDA-graph replay.
        """
        import torch

        groups: dict[int, list[int]] = {}
        for row, (code, *_rest) in enumerate(calls):
            groups.setdefault(int(code.shape[-1]), []).append(row)
        chunks = [rows[i : i + max_rows] for rows in groups.values() for i in range(0, len(rows), max_rows)]
        waves: list[Any] = [None] * len(calls)
        for rows in chunks:
            code = torch.cat([calls[r][0] for r in rows])  # [G, n]
            cond = torch.cat([calls[r][1] for r in rows])  # [G, C]
            mel = torch.cat([calls[r][2] for r in rows])  # [G, T, M]
            ode = {
                k: v
                for k, v in calls[rows[0]][3].items()
                if k in ("num_steps", "guidance_scale", "sway_coefficient")
            }
            spectrograms = _dit_sample(
                token2wav.code2wav_dit_model, cond, mel, code, seed, **ode, graphs=graphs,
                autocast=dit_dtype == "bfloat16",
            )
            spectrograms = spectrograms.float()  # [G, M, frames]
            audio = token2wav.code2wav_bigvgan_model(
                spectrograms
            )  # [G, samples] ([samples] if G = 1), on CPU
            for i, r in enumerate(audio.reshape(len(rows), -1)):
                waves[rows[i]] = r.float()
        return waves

    def prompt_texts(self, config: GenerationConfig) -> dict[str, str | None]:
        from esn_qwen_omni.prompt import system_prompt

        return {"system_prompt": system_prompt(config.system_prompt), "instruction": config.instruction}

    def generate(self, requests: Sequence[EVCRequest], config: GenerationConfig) -> list[EVCResult]:
        """All requests as rows of one left-padded batch; each row converts as in its solo run.

        Text and codec tokens are greedy, decoded through ``esn.decode`` (option ``decode="graph"``, the
        default on CUDA) or transformers' ``generate`` (``"generate"``); both give the same tokens. Then
        token2wav decodes rows whose codes have the same length in batches of ``token2wav_batch``
        (option; default 1 = row by row, bit-identical to the solo run). Every row's ODE starts from the
        noise its solo run draws after seeding with ``config.seed``, so with batches a row's audio
        depends on its batch mates only through the rounding of batched kernels. The global RNG state is
        restored afterwards.
        """
        from esn_qwen_omni.prompt import system_prompt

        if not requests:
            return []
        speaker = config.speaker or DEFAULT_SPEAKER
        if speaker not in self.model.speaker_map:
            raise EsnError(f"unknown speaker {speaker!r} for {self.source}; available: {', '.join(self.speakers)}")
        options = self._options(config.options)
        device = self.device
        decode = decode_mode(self.name, options.pop("decode", None), device)
        rows_per_batch = options.pop("token2wav_batch", 1)
        if rows_per_batch < 1:
            raise EsnError(f"qwen_omni option token2wav_batch must be >= 1, got {rows_per_batch}")
        tf32 = options.pop("token2wav_tf32", False)
        dit_dtype = options.pop("token2wav_dit_dtype", "float32")
        dit_graphs = self._dit_graphs if options.pop("token2wav_graph", device.type == "cuda") else None
        if dit_dtype not in DIT_DTYPES:
            raise EsnError(f"qwen_omni option token2wav_dit_dtype must be one of {', '.join(DIT_DTYPES)}, got {dit_dtype!r}")
        batch = self.prompts.batch(
            [r.audio for r in requests],
            system_prompt(config.system_prompt),
            [self.instruction(r, config) for r in requests],
            [r.id for r in requests],
        )
        inputs = {k: v.to(device) for k, v in batch.tensors.items()}
        inputs["input_features"] = inputs["input_features"].to(self.model.thinker.dtype)
        with seeded(config.seed, device):  # token2wav seeds each group's noise again
            if decode == "generate":
                text, calls = self._generate_transformers(inputs, config, options, speaker)
            else:
                text, calls = self._generate_graph(inputs, config, options, speaker)
            if len(calls) != len(requests):
                raise EsnError(f"{self.source}: token2wav got {len(calls)} rows for {len(requests)} requests")
            codes = [call[0].reshape(-1).cpu() for call in calls]
            with _tf32(tf32):
                waves = self._decode_in_groups(
                    self.model.token2wav, calls, config.seed, rows_per_batch, dit_dtype,
                    dit_graphs if device.type == "cuda" else None,
                )
        text = text.cpu()
        results = []
        for i, request in enumerate(requests):
            ids = text[i].tolist()
            words, n_text = self.prompts.decode(ids)
            results.append(
                EVCResult(
                    id=request.id,
                    text=words,
                    waveform=waves[i].detach().float().cpu().numpy().reshape(-1),
                    sample_rate=self.sample_rate,
                    info={
                        "prompt_tokens": batch.prompt_lengths[i],
                        "text_tokens": n_text,
                        "text_ids": ids[:n_text],
                        "audio_tokens": int(codes[i].numel()),
                        "audio_codes": codes[i].tolist(),
                        "speaker": speaker,
                        "decode": decode,
                    },
                )
            )
        return results

    def _generate_transformers(self, inputs: dict, config: GenerationConfig, options: dict, speaker: str) -> tuple[Any, list]:
        """transformers' generate: the generated text tokens ``[B, n]`` and token2wav's calls per row."""
        from esn.hooks import installed

        # generate hands each row's codes to the catcher; token2wav runs afterwards, in length groups.
        catcher = _CodeCatcher(self.model.token2wav)
        with installed([(self.model.talker, _restore_talker_mask)], kind="pre", with_kwargs=True), \
                _swapped(self.model, "token2wav", catcher):
            sequences, _ = self.model.generate(
                **inputs,
                speaker=speaker,
                **greedy_generate_options("thinker", config.max_new_tokens, self.prompts.stop_ids, self.prompts.pad),
                **greedy_generate_options("talker", config.max_audio_tokens, self.talker_stop_ids, unset_sampling=True),
                **options,
            )
        return sequences[:, inputs["input_ids"].shape[1] :], catcher.calls

    def _generate_graph(self, inputs: dict, config: GenerationConfig, options: dict, speaker: str) -> tuple[Any, list]:
        """esn.decode: the same tokens as ``_generate_transformers``, each decode step one CUDA-graph replay."""
        from esn.decode import Greedy

        from esn_qwen_omni.decode import generate_codes

        model, talker = self.model, self.model.talker
        thinker = Greedy(
            config.max_new_tokens,
            tuple(self.prompts.stop_ids),
            int(self.prompts.pad),
            min_new_tokens=options.get("thinker_min_new_tokens", 0),
            repetition_penalty=float(model.thinker.generation_config.repetition_penalty or 1.0),
        )
        codec = Greedy(
            config.max_audio_tokens,
            tuple(self.talker_stop_ids),
            int(talker.codec_pad_token),
            min_new_tokens=options["talker_min_new_tokens"],
            repetition_penalty=options.get("talker_repetition_penalty", 1.05),  # Qwen's generate default
            suppress_token_ids=(int(talker.codec_bos_token),),
        )
        params = model.speaker_map[speaker]
        out = generate_codes(model, self._sessions, inputs, speaker_bos=int(params["bos_token"]), thinker=thinker,
                             talker=codec, capture=self.capture)
        batch, device = len(out.codes), self.device
        cond = params["cond"].to(device).float().expand(batch, -1)
        mel = params["ref_mel"].to(device).float().expand(batch, -1, -1)
        ode = {k[len("token2wav_"):]: v for k, v in options.items() if k.startswith("token2wav_")}
        self.last_decode_info = out.info
        return out.text, [(code, cond[i : i + 1], mel[i : i + 1], ode) for i, code in enumerate(out.codes)]

    def release_decode_buffers(self) -> None:
        """Free the static caches and CUDA graphs that ``decode="graph"`` and ``token2wav_graph`` keep."""
        super().release_decode_buffers()
        self._dit_graphs.clear()
