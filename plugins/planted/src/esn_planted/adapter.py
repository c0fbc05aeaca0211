"""``PlantedAdapter``: the planted model (``esn_planted.model``) as an esn adapter.

Hook points: ``lm.layers.{l}.mlp.gate`` -> ``model.layers.{l}.mlp.act_fn`` (``[batch, pos, 64]``), 4 layers.
A conversion: the source audio becomes ``FRAMES`` audio tokens, the prompt is ``BOS, audio, EMO_<target>,
SEP``, greedy decoding emits one speech code per step, and the codes are rendered at the source's pitch
times each code's emotion factor, louder the surer the model is of the code (``esn_planted.sound``).

The decoded text is the request's reference transcript (empty without one), word k "said" at generated step k
(cycling over the steps): a step whose content ratio (``esn_planted.model``: CONTENT / BIAS from the two text
logits) exceeds the checkpoint's limit garbles its words. So WER is 0 unless steering pushes the content
neurons (generic ones, or planted ones strongly); a checkpoint built with ``content=False`` always says the
transcript.

A checkpoint written with ``synth=True`` also has hook points ``synth.layers.{l}.mlp.gate`` ->
``synth.model.layers.{l}.mlp.act_fn`` (``[batch, pos, 64]``): a second planted model run once over
``BOS, EMO_<target>, SEP`` and the generated codes after generation, like a speech decoder: how sure it is
of its codes sets the loudness (``synth_gain``), nothing else. Pitch, which carries the emotion, and the
text never depend on it, so steering it moves no emotion judge that hears pitch (inert), while steering every
one of its gates still changes the sound. A checkpoint written with ``synth_audible=True`` is the control:
there the synth's own emotional code decisions (any but neutral) replace the language model's codes, so its
planted neurons do steer what is heard.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from esn.adapters import (
    EVCRequest,
    EVCResult,
    GenerationConfig,
    ModelAdapter,
    StreamSpec,
    check_dtype,
    parse_options,
)
from esn.errors import EsnError
from esn.hookpoints import HookPoint

from esn_planted import model as planted
from esn_planted import sound


class PlantedAdapter(ModelAdapter):
    """The planted model as an adapter: one ``lm`` stream of 4 x 64 gate neurons; ``ground_truth`` names the
    planted ones."""

    name = "planted"
    architectures = ("Qwen2ForCausalLM",)
    streams = ("lm", "synth")  # synth only for a checkpoint written with synth=True
    model_name = "planted (synthetic)"
    description = "a tiny hand-built model with known emotion neurons (esn demo); not a real LALM"
    batched = True
    sample_rate = sound.RATE
    text_out = False  # its "text" is the request's transcript, not something the model wrote

    def __init__(self, model: Any, source: str | Path, meta: dict):
        super().__init__(model, source)
        self.meta = meta
        tokens = meta["tokens"]
        self.instruction_ids = {e: int(i) for e, i in tokens["instruction"].items()}
        self.codes = {int(i): e for e, i in tokens["code"].items()}
        self.audio_first = int(tokens["audio_first"])

    @classmethod
    def load(cls, source, *, dtype: str = "auto", device: str = "cpu", attn_implementation: str | None = None,
             trust_remote_code: bool = False) -> PlantedAdapter:
        import torch
        from transformers import Qwen2ForCausalLM

        check_dtype(dtype)
        root = Path(source)
        meta_path, config_path = root / "planted.json", root / "config.json"
        if not meta_path.is_file() or not config_path.is_file():
            raise EsnError(f"{source}: not a planted checkpoint (needs config.json and planted.json; "
                           "write one with `esn_planted.model.write` or PlantedAdapter.write_tiny)")
        cls.check_architectures(json.loads(config_path.read_text()), source)
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != "esn-planted/1":
            raise EsnError(f"{meta_path}: format {meta.get('format')!r}, expected 'esn-planted/1'")
        torch_dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = Qwen2ForCausalLM.from_pretrained(root, dtype=torch_dtype, **extra).to(device).eval()
        if meta.get("synth"):  # a submodule, so hook paths, devices and dtypes cover it
            model.synth = Qwen2ForCausalLM.from_pretrained(root / "synth", dtype=torch_dtype, **extra).to(device).eval()
        return cls(model, source, meta)

    @classmethod
    def write_tiny(cls, directory, *, seed: int = 0, **options) -> Path:
        """The planted checkpoint; ``options`` (content, hard, gamma, layers, planted_layers) build a variant."""
        return planted.write(directory, seed=seed, **options)

    @property
    def ground_truth(self) -> dict[str, np.ndarray]:
        """``{target emotion: flat indices of its planted neurons}`` in this adapter's lm layout."""
        return {e: np.asarray(v, dtype=np.int64) for e, v in self.meta["planted"].items()}

    @property
    def synth_truth(self) -> dict[str, np.ndarray]:
        """``{target emotion: flat indices}`` of the synth stream's planted neurons (empty without one)."""
        synth = self.meta.get("synth") or {"planted": {}}
        return {e: np.asarray(v, dtype=np.int64) for e, v in synth["planted"].items()}

    def hook_points(self) -> list[HookPoint]:
        cfg = self.model.config
        out = [HookPoint("lm", layer, int(cfg.intermediate_size), f"model.layers.{layer}.mlp.act_fn",
                         f"model.layers.{layer}.mlp.down_proj") for layer in range(cfg.num_hidden_layers)]
        if hasattr(self.model, "synth"):
            sc = self.model.synth.config
            out += [HookPoint("synth", layer, int(sc.intermediate_size), f"synth.model.layers.{layer}.mlp.act_fn",
                              f"synth.model.layers.{layer}.mlp.down_proj") for layer in range(sc.num_hidden_layers)]
        return out

    def stream_specs(self) -> dict[str, StreamSpec]:
        specs = {"lm": StreamSpec(root="model", stop_token_ids=(planted.EOS,))}
        if hasattr(self.model, "synth"):
            specs["synth"] = StreamSpec(root="synth.model")
        return specs

    def prompt_texts(self, config: GenerationConfig) -> dict[str, str | None]:
        return {"system_prompt": "none (the planted model reads no text)",
                "instruction": "the instruction token EMO_{emotion} after the audio tokens"}

    def prompt(self, request: EVCRequest) -> list[int]:
        """The token ids of one conversion's prompt: ``BOS``, the audio tokens, ``EMO_<target>``, ``SEP``."""
        return [planted.BOS, *sound.audio_tokens(request.audio, self.audio_first, int(self.meta['tokens']['audio_count'])),
                self.instruction_ids[request.emotion], planted.SEP]

    def generate(self, requests: Sequence[EVCRequest], config: GenerationConfig) -> list[EVCResult]:
        import torch

        parse_options(self.name, config.options, {})
        if not requests:
            return []
        prompts = [self.prompt(r) for r in requests]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[planted.PAD] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=config.max_new_tokens, eos_token_id=planted.EOS,
                                      pad_token_id=planted.PAD, output_logits=True, return_dict_in_generate=True)
        code_ids = torch.tensor(sorted(self.codes), device=self.device)
        # How sure the model is of each code (softmax over the codes): the voice's effort, i.e. loudness.
        sure = torch.stack([step.float().index_select(1, code_ids).softmax(-1).max(-1).values for step in out.logits],
                           dim=1).cpu().numpy()  # [batch, steps]
        drift = self._content(out.logits)  # [batch, steps] bool: the step's words are garbled
        gain, voiced = (self._synthesise(requests, out.sequences[:, width:]) if hasattr(self.model, "synth")
                        else (None, None))
        results = []
        for k, (request, row) in enumerate(zip(requests, out.sequences[:, width:].tolist(), strict=True)):
            steps = [i for i, t in enumerate(row) if t not in (planted.EOS, planted.PAD)]
            codes = [self.codes.get(row[i], "?") for i in steps]
            if voiced is not None and (self.meta.get("synth") or {}).get("audible"):  # the control variant
                codes = [v if v != "neutral" else c for c, v in zip(codes, voiced[k], strict=True)]
            f0 = sound.source_pitch(request.audio) or sound.REFERENCE_F0
            # rounded: a row's sound must not depend on the rounding of its batch mates' kernels
            loud = 1.0 if gain is None else float(gain[k])
            wave = sound.render(codes, f0, [round(float(sure[k, i]) * loud, 2) for i in steps])
            text = say(request.transcript or "", [bool(drift[k, i]) for i in steps])
            results.append(EVCResult(request.id, text, wave, self.sample_rate,
                                     {"codes": codes, "f0": round(f0, 2), "prompt_tokens": width}))
        return results

    def _synthesise(self, requests: Sequence[EVCRequest], generated) -> tuple[np.ndarray, list[list[str]]]:
        """The synth stream's one forward over ``BOS, EMO_<target>, SEP, codes`` -> ``[batch]`` loudness in
        [0.5, 1] (how sure it is of its codes: softmax over them, mean over its real positions, rounded), and
        per row the code it would say at each of the language model's codes (used only when audible)."""
        import torch

        rows = [[planted.BOS, self.instruction_ids[r.emotion], planted.SEP,
                 *[t for t in row if t not in (planted.EOS, planted.PAD)]] for r, row in zip(requests, generated.tolist(),
                                                                                           strict=True)]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[planted.PAD] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        with torch.inference_mode():
            logits = self.model.synth(input_ids=ids, attention_mask=mask).logits.float()
        code_ids = torch.tensor(sorted(self.codes), device=self.device)
        sure = logits.index_select(-1, code_ids).softmax(-1).max(-1).values  # [batch, pos]
        real = mask.float()
        mean = (sure * real).sum(1) / real.sum(1)
        best = logits.index_select(-1, code_ids).argmax(-1).cpu().tolist()  # [batch, pos]
        names = [self.codes[int(i)] for i in code_ids.tolist()]
        voiced = [[names[b] for b in best[k][width - (len(r) - 3):]] for k, r in enumerate(rows)]
        return (0.5 + 0.5 * mean).cpu().numpy().round(2), voiced

    def _content(self, logits) -> np.ndarray:
        """``[batch, steps]``: whether each step's content ratio CONTENT / BIAS exceeds the limit (all False
        for a checkpoint without content)."""
        import torch

        spec = self.meta.get("content")
        if not spec:
            return np.zeros((logits[0].shape[0], len(logits)), dtype=bool)
        text = torch.stack([step[:, int(spec["text"])].float() for step in logits], dim=1)
        ref = torch.stack([step[:, int(spec["text_ref"])].float() for step in logits], dim=1)
        ratio = (text - ref) / (-ref / 20.0)  # TEXT - TEXT_REF = CONTENT, TEXT_REF = -20 BIAS (normed alike)
        # rounded: a row's text must not depend on the rounding of its batch mates' kernels
        return (ratio.cpu().numpy().round(3) > float(spec["limit"]))


def say(transcript: str, garbled: list[bool]) -> str:
    """The transcript as said: word k at step k (cycling), replaced by a wrong word where its step drifted."""
    words = transcript.split()
    if not garbled:
        return transcript
    return " ".join("uh" if garbled[k % len(garbled)] else w for k, w in enumerate(words))
