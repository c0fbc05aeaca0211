"""``PlantedAdapter``: the planted model (``esn_planted.model``) as an esn adapter.

Hook points: ``lm.layers.{l}.mlp.gate`` -> ``model.layers.{l}.mlp.act_fn`` (``[batch, pos, 64]``), 4 layers.
A conversion: the source audio becomes ``FRAMES`` audio tokens, the prompt is ``BOS, audio, EMO_<target>,
SEP``, greedy decoding emits one speech code per step, and the codes are rendered at the source's pitch
times each code's emotion factor, louder the surer the model is of the code (``esn_planted.sound``). The model models no words: its decoded text is
the request's reference transcript (empty without one), so WER is 0 and only the emotion axis moves.
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
    streams = ("lm",)
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
        return cls(model, source, meta)

    @classmethod
    def write_tiny(cls, directory, *, seed: int = 0) -> Path:
        return planted.write(directory, seed=seed)

    @property
    def ground_truth(self) -> dict[str, np.ndarray]:
        """``{target emotion: flat indices of its planted neurons}`` in this adapter's lm layout."""
        return {e: np.asarray(v, dtype=np.int64) for e, v in self.meta["planted"].items()}

    def hook_points(self) -> list[HookPoint]:
        cfg = self.model.config
        return [HookPoint("lm", layer, int(cfg.intermediate_size), f"model.layers.{layer}.mlp.act_fn",
                          f"model.layers.{layer}.mlp.down_proj") for layer in range(cfg.num_hidden_layers)]

    def stream_specs(self) -> dict[str, StreamSpec]:
        return {"lm": StreamSpec(root="model", stop_token_ids=(planted.EOS,))}

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
        results = []
        for k, (request, row) in enumerate(zip(requests, out.sequences[:, width:].tolist(), strict=True)):
            steps = [i for i, t in enumerate(row) if t not in (planted.EOS, planted.PAD)]
            codes = [self.codes.get(row[i], "?") for i in steps]
            f0 = sound.source_pitch(request.audio) or sound.REFERENCE_F0
            # rounded: a row's sound must not depend on the rounding of its batch mates' kernels
            wave = sound.render(codes, f0, [round(float(sure[k, i]), 2) for i in steps])
            results.append(EVCResult(request.id, request.transcript or "", wave, self.sample_rate,
                                     {"codes": codes, "f0": round(f0, 2), "prompt_tokens": width}))
        return results
