"""An independent third-party adapter for Sesame CSM (transformers' ``CsmForConditionalGeneration``),
written from the adapter guide alone, to check that recording and steering do not silently miscount.

CSM is a SwiGLU backbone (``lm``: one frame per position) and a depth decoder shared across codebooks
(``synth``) that runs a whole sub-generation per frame: after each backbone forward, a
``depth_decoder.generate`` of K positions (a 2-position prefill, then K - 2 steps) writes the frame's
codebooks. The reference is plain forward hooks on the ``act_fn`` modules: ``(g > 0)`` per unit over
every position the gates ran.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from esn.adapters import EVCResult, GenerationConfig, ModelAdapter, StreamSpec
from esn.errors import EsnError
from esn.hooks import gate_hook_points
from esn.masks import Mask
from esn.recording import GateRecorder
from esn.steering import steer
from esn.testing import ConformanceError, check_hook_points, run_conformance, tiny_config, tiny_requests

K = 3  # codebooks
BOS, PAD, AUDIO, AUDIO_EOS = 256, 257, 258, 259


def _tiny_config():
    from transformers import CsmConfig, MimiConfig

    mimi = MimiConfig(hidden_size=16, num_filters=4, num_residual_layers=1, upsampling_ratios=[8, 6, 5, 4],
                      kernel_size=3, last_kernel_size=3, residual_kernel_size=3, codebook_size=16, codebook_dim=8,
                      num_quantizers=K, num_semantic_quantizers=1, vector_quantization_hidden_dimension=8,
                      upsample_groups=16, num_hidden_layers=1, intermediate_size=16, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=8, sliding_window=16, max_position_embeddings=64)
    depth = dict(num_codebooks=K, backbone_hidden_size=16, vocab_size=16, hidden_size=16, intermediate_size=20,
                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                 max_position_embeddings=K + 1)
    config = CsmConfig(num_codebooks=K, vocab_size=16, text_vocab_size=260, hidden_size=16, intermediate_size=24,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                       max_position_embeddings=256, pad_token_id=PAD, bos_token_id=BOS, audio_token_id=AUDIO,
                       audio_eos_token_id=AUDIO_EOS, codebook_pad_token_id=15, codebook_eos_token_id=0,
                       depth_decoder_config=depth, codec_config=mimi.to_dict())
    config.architectures = ["CsmForConditionalGeneration"]
    return config


class CsmAdapter(ModelAdapter):
    """Test-only adapter: backbone MLP gates (``lm``), depth-decoder MLP gates (``synth``)."""

    name = "csm_independent"
    architectures = ("CsmForConditionalGeneration",)
    model_name = "Sesame CSM"
    description = "Sesame CSM (test-only): backbone gates (lm), depth decoder gates (synth)"
    batched = False
    sample_rate = 24_000
    instruction_channel = False  # CSM takes no instruction
    speaks_given_words = True  # it speaks the transcript it is given
    text_out = False  # and writes no text

    @classmethod
    def load(cls, source, *, dtype="auto", device="cpu", attn_implementation=None, trust_remote_code=False):
        from transformers import CsmForConditionalGeneration

        model = CsmForConditionalGeneration.from_pretrained(str(source), dtype=torch.float32)
        return cls(model.to(device).eval(), source)

    @classmethod
    def write_tiny(cls, directory, *, seed: int = 0) -> Path:
        from transformers import CsmForConditionalGeneration

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        model = CsmForConditionalGeneration(_tiny_config()).eval()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # Mimi's codebooks are built as zeros: the input speech would not get through
            for book in (m for m in model.modules() if type(m).__name__ == "MimiEuclideanCodebook"):
                book.embed_sum.copy_(torch.randn(book.embed_sum.shape, generator=gen))
                book.cluster_usage.fill_(1.0)
                book._embed = None
            for name, p in model.codec_model.quantizer.named_parameters():  # spread frames over the codes
                if name.endswith("input_proj.weight"):
                    p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
        model.save_pretrained(directory)
        return directory

    def hook_points(self):
        return (gate_hook_points(self.model, "backbone_model.layers", "lm")
                + gate_hook_points(self.model, "depth_decoder.model.layers", "synth"))

    def stream_specs(self):
        # the guide: a decoder run per frame of another one is a substep of that decoder, listed in the
        # spec of the stream its hook points are in; it runs K positions per backbone step
        return {"lm": StreamSpec(root="backbone_model"),
                "synth": StreamSpec(root="backbone_model", substeps=("depth_decoder",), substep_positions=K)}

    def generate(self, requests, config: GenerationConfig):
        return [self._one(r, config) for r in requests]

    def _one(self, request, config):
        from esn.audio import MODEL_RATE, resample

        model = self.model
        wave = torch.from_numpy(resample(request.audio, MODEL_RATE, self.sample_rate)).float()[None, None]
        frames = int(model.codec_model.get_audio_codes_mask(torch.ones(1, wave.shape[-1], dtype=torch.bool)).sum())
        words = list((request.transcript or "").encode()[:16])
        ids = torch.tensor([[BOS, *words, *[AUDIO] * frames, AUDIO_EOS]])
        torch.manual_seed(config.seed)
        with torch.inference_mode():
            codes = model.generate(input_ids=ids, input_values=wave,
                                   input_values_cutoffs=torch.tensor([[wave.shape[-1]]]),
                                   max_new_tokens=max(2, min(config.max_audio_tokens, 4)), do_sample=False,
                                   depth_decoder_do_sample=False)
            audio = model.codec_model.decode(codes[0].T[None].clamp(max=15)).audio_values
        return EVCResult(request.id, "", audio[0, 0].numpy().astype(np.float32), self.sample_rate,
                         {"target_emotion": request.emotion, "instruction_sent": False})


class NaiveCsmAdapter(CsmAdapter):
    """The naive declaration: ``batched = False`` and no stream spec."""

    name = "csm_naive"

    def stream_specs(self):
        return {}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return CsmAdapter.write_tiny(tmp_path_factory.mktemp("csm"))


@pytest.fixture(scope="module")
def adapter(checkpoint):
    return CsmAdapter.load(checkpoint)


def _reference(adapter, requests, config, edit=None):
    """Per request: for each hook point, (counts [d], positions, prompt counts, prompt positions), from
    plain forward hooks on the act_fn modules; the backbone's first call of a request is its prompt."""
    out = []
    for request in requests:
        acc, state = {}, {"backbone_calls": 0}

        def backbone_pre(module, args, kwargs, state=state):
            state["backbone_calls"] += 1

        handles = [adapter.model.backbone_model.register_forward_pre_hook(backbone_pre, with_kwargs=True)]
        for hp in adapter.hook_points():
            def hook(module, args, g, hp=hp, acc=acc, state=state):
                g = g.detach()
                a = acc.setdefault(hp.name, [torch.zeros(g.shape[-1], dtype=torch.int64), 0,
                                             torch.zeros(g.shape[-1], dtype=torch.int64), 0])
                c, n = (g > 0).reshape(-1, g.shape[-1]).sum(0), g.shape[0] * g.shape[1]
                a[0] += c
                a[1] += n
                if hp.stream == "lm" and state["backbone_calls"] == 1:
                    a[2] += c
                    a[3] += n
                if edit is not None:
                    edit(hp, g)
            handles.append(adapter.module(hp).register_forward_hook(hook))
        try:
            adapter.generate([request], config)
        finally:
            for h in handles:
                h.remove()
        out.append(acc)
    return out


def _config():
    return tiny_config(max_audio_tokens=4)


def test_guide_declaration_counts_exactly(adapter):
    requests, config = tiny_requests(2), _config()
    ref = _reference(adapter, requests, config)
    with GateRecorder(adapter, positions="all") as rec:
        adapter.generate(requests, config)
    stats = rec.stats()
    layout = stats.layout
    for row, acc in enumerate(ref):
        for hp in adapter.hook_points():
            counts, n, pcounts, pn = acc[hp.name]
            cols, group = layout.slice(hp.name), layout.group_slice(hp.name)
            assert torch.equal(torch.as_tensor(stats.counts[row, cols]).long(), counts), hp.name
            assert int(stats.tokens[row, group].sum()) == n, hp.name
            assert torch.equal(torch.as_tensor(stats.prompt_counts[row, cols]).long(), pcounts), hp.name
            assert int(stats.prompt_tokens[row, group].sum()) == pn, hp.name
    # positions="generated" records exactly the non-prompt part
    with GateRecorder(adapter, positions="generated") as rec:
        adapter.generate(requests, config)
    gen = rec.stats()
    assert np.array_equal(np.asarray(gen.counts), np.asarray(stats.counts) - np.asarray(stats.prompt_counts))
    assert np.array_equal(np.asarray(gen.tokens), np.asarray(stats.tokens) - np.asarray(stats.prompt_tokens))
    # synth ran K positions per frame, all generated; lm's prompt is the backbone prefill
    frames = ref[0]["lm.layers.0.mlp.gate"][1] - ref[0]["lm.layers.0.mlp.gate"][3] + 1
    assert ref[0]["synth.layers.0.mlp.gate"][1] == K * frames


def test_naive_declaration_is_refused(checkpoint):
    naive = NaiveCsmAdapter.load(checkpoint)
    with pytest.raises(EsnError, match="substeps"):
        with GateRecorder(naive, positions="generated"):
            naive.generate(tiny_requests(1), _config())


def test_a_synth_root_that_does_not_run_it_is_refused_by_conformance(checkpoint):
    class NoSubsteps(CsmAdapter):
        def stream_specs(self):
            return {"lm": StreamSpec(root="backbone_model"), "synth": StreamSpec(root="backbone_model")}

    with pytest.raises(ConformanceError, match=r"stream spec 'synth': .* not under its root 'backbone_model'"):
        check_hook_points(NoSubsteps.load(checkpoint))


def test_steer_edits_exactly_the_selected_synth_units(adapter):
    requests, config = tiny_requests(1), _config()
    layout = adapter.layout()
    hp = next(h for h in adapter.hook_points() if h.name == "synth.layers.1.mlp.gate")
    units = [1, 4, 7]
    mask = Mask.from_split(layout, {hp.name: np.array(units)})
    seen: list[torch.Tensor] = []
    plain: list[torch.Tensor] = []
    _reference(adapter, requests, config, edit=lambda h, g: plain.append(g.clone()) if h.name == hp.name else None)
    with steer(adapter, mask, "steer", 1.0):
        _reference(adapter, requests, config, edit=lambda h, g: seen.append(g.clone()) if h.name == hp.name else None)
    assert len(seen) == len(plain) > 0
    # alpha 1 scales by 2: the first call (identical inputs) shows exactly the selected units doubled
    first_plain, first_seen = plain[0], seen[0]
    expect = first_plain.clone()
    expect[..., units] *= 2
    assert torch.equal(first_seen, expect)
    # every position of every call: the selected units are twice the act_fn of the gate_proj input
    # recomputed here from the module's own input, the others untouched
    mlp = adapter.model.get_submodule(hp.module.rsplit(".", 1)[0])
    calls = []
    handle = mlp.register_forward_hook(lambda m, a, o: calls.append(a[0].detach().clone()))
    try:
        with steer(adapter, mask, "steer", 1.0):
            seen.clear()
            _reference(adapter, requests, config, edit=lambda h, g: seen.append(g.clone()) if h.name == hp.name else None)
    finally:
        handle.remove()
    assert len(calls) == len(seen)
    others = [u for u in range(hp.width) if u not in units]
    for x, g in zip(calls, seen, strict=True):
        with torch.inference_mode():
            raw = mlp.act_fn(mlp.gate_proj(x))
        assert torch.equal(g[..., units], 2 * raw[..., units])
        assert torch.equal(g[..., others], raw[..., others])


def test_conformance(tmp_path):
    run_conformance(CsmAdapter, tmp_path)


def _edited_positions(adapter, mask, name, units, positions):
    """(positions where ``units`` came out of act_fn doubled, positions the gate ran) under steer alpha 1."""
    hp = next(h for h in adapter.hook_points() if h.name == name)
    mlp = adapter.model.get_submodule(hp.module.rsplit(".", 1)[0])
    outs, ins = [], []
    with steer(adapter, mask, "steer", 1.0, positions=positions):
        handles = [adapter.module(hp).register_forward_hook(lambda m, a, o: outs.append(o.detach().clone())),
                   mlp.register_forward_hook(lambda m, a, o: ins.append(a[0].detach().clone()))]
        try:
            adapter.generate(tiny_requests(2), _config())
        finally:
            for h in handles:
                h.remove()
    edited = total = 0
    for o, x in zip(outs, ins, strict=True):
        with torch.inference_mode():
            raw = mlp.act_fn(mlp.gate_proj(x))
        edited += int((o[..., units] == 2 * raw[..., units]).all(-1).sum())
        total += o.shape[0] * o.shape[1]
    return edited, total


def test_steer_generated_edits_every_synth_position(adapter):
    name, units = "synth.layers.0.mlp.gate", [0, 5]
    mask = Mask.from_split(adapter.layout(), {name: np.array(units)})
    edited, total = _edited_positions(adapter, mask, name, units, "generated")
    assert edited == total == 2 * K * 4  # 2 requests x 4 frames x K positions, all generated


def test_naive_declaration_steering_generated_is_refused(checkpoint):
    naive = NaiveCsmAdapter.load(checkpoint)
    name = "synth.layers.0.mlp.gate"
    mask = Mask.from_split(naive.layout(), {name: np.array([0, 5])})
    assert _edited_positions(naive, mask, name, [0, 5], "all") == (2 * K * 4, 2 * K * 4)
    with pytest.raises(EsnError, match=r"synth\.layers\.0\.mlp\.gate .* second prefill .*substeps="):
        _edited_positions(naive, mask, name, [0, 5], "generated")
    assert "generate" not in vars(naive), vars(naive).get("generate")  # the per-request wrapper is gone


@pytest.mark.parametrize("outside", ["steer", "recorder"])
def test_recording_and_steering_nest_either_way_on_a_one_by_one_adapter(checkpoint, outside):
    naive = NaiveCsmAdapter.load(checkpoint)  # lm has no spec: steering splits requests, so does the recorder
    mask = Mask.from_split(naive.layout(), {"lm.layers.0.mlp.gate": np.array([1])})
    blocks = [lambda: steer(naive, mask, "steer", 1.0, positions="generated"),
              lambda: GateRecorder(naive, streams=["lm"])]
    outer, inner = blocks if outside == "steer" else blocks[::-1]
    with outer() as a, inner() as b:
        naive.generate(tiny_requests(2), _config())
    rec = a if outside == "recorder" else b
    stats = rec.stats()
    assert stats.tokens.tolist() == [[18, 18], [18, 18]]  # one row per request: 15 prompt + 3 decode
    assert stats.prompt_tokens.tolist() == [[15, 15], [15, 15]]
    assert "generate" not in vars(naive)
