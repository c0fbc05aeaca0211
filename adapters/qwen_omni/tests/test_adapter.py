"""QwenOmniAdapter on a tiny real Qwen2_5OmniForConditionalGeneration (saved, then loaded back)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from esn.adapters import EVCRequest, GenerationConfig
from esn.errors import EsnError
from esn_qwen_omni import QwenOmniAdapter
from esn_qwen_omni.speakers import load_speakers


def test_plugin_import_is_cheap_and_registers():
    code = "import sys, esn_qwen_omni.plugin; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    from esn.plugins import registry

    assert registry(refresh=True).adapter("qwen_omni") is QwenOmniAdapter


def test_tiny_checkpoint_is_small(tiny_dir):
    names = sorted(p.name for p in tiny_dir.iterdir())
    assert {"config.json", "model.safetensors", "speakers.safetensors", "tokenizer.json"} <= set(names)
    assert not any(n.endswith((".pt", ".bin", ".pkl")) for n in names)  # nothing pickled
    assert sum(p.stat().st_size for p in tiny_dir.iterdir()) < 5 * 2**20


def test_hook_points_are_thinker_lm_and_talker_mlps(adapter):
    acts = [n for n, _ in adapter.model.named_modules() if n.endswith("mlp.act_fn")]
    lm = [n for n in acts if n.startswith("thinker.model.language_model.layers.")]
    synth = [n for n in acts if n.startswith("talker.model.layers.")]
    assert any(n.startswith("thinker.model.visual.") for n in acts)  # exists, must be left out
    points = adapter.hook_points()
    assert [p.module for p in points] == lm + synth
    assert [p.name for p in points] == [f"lm.layers.{i}.mlp.gate" for i in range(len(lm))] + [
        f"synth.layers.{i}.mlp.gate" for i in range(len(synth))
    ]
    for p in points:
        mlp = adapter.model.get_submodule(p.module.rsplit(".", 1)[0])
        assert adapter.module(p) is mlp.act_fn
        assert p.width == mlp.gate_proj.out_features == mlp.down_proj.in_features
    assert adapter.layout(["lm"]).n_neurons == 2 * 64 and adapter.layout(["synth"]).n_neurons == 2 * 48


def test_envoys_point_at_the_act_fn_modules(adapter):
    nnsight = pytest.importorskip("nnsight")
    traced = nnsight.NNsight(adapter.model)
    for p in adapter.hook_points():
        assert adapter.envoy(traced, p)._module is adapter.module(p)


def test_load_refuses_other_architectures_and_missing_files(tiny_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["Qwen2ForCausalLM"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(EsnError, match=r"Qwen2ForCausalLM.*not Qwen2.5-Omni"):
        QwenOmniAdapter.load(other)
    with pytest.raises(EsnError, match="not found"):
        QwenOmniAdapter.load(tmp_path / "missing")
    with pytest.raises(EsnError, match="is a file"):
        QwenOmniAdapter.load(other / "config.json")
    nospk = tmp_path / "nospk"
    shutil.copytree(tiny_dir, nospk)
    (nospk / "speakers.safetensors").unlink()
    with pytest.raises(EsnError, match="speaker file"):
        QwenOmniAdapter.load(nospk)
    with pytest.raises(EsnError, match="dtype"):
        QwenOmniAdapter.load(tiny_dir, dtype="float8")


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_spk_dict_pt_is_read_weights_only(tmp_path):
    good = {"Chelsie": {"bos_token": 7, "cond": torch.ones(1, 4), "ref_mel": torch.zeros(1, 3, 8)}}
    torch.save(good, tmp_path / "spk_dict.pt")
    loaded = load_speakers(tmp_path / "spk_dict.pt")
    assert loaded["Chelsie"]["bos_token"] == 7 and torch.equal(loaded["Chelsie"]["cond"], torch.ones(1, 4))
    torch.save({"Chelsie": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(EsnError, match="safely"):
        load_speakers(tmp_path / "evil.pt")


def test_generate_returns_text_and_24khz_speech(adapter, requests_, config):
    (res,) = adapter.generate(requests_[:1], config)
    assert isinstance(res.text, str) and "<|" not in res.text
    assert res.sample_rate == 24_000 and res.waveform.dtype == np.float32 and res.waveform.ndim == 1
    assert res.info["text_tokens"] <= config.max_new_tokens
    assert 12 <= res.info["audio_tokens"] <= 16 == config.max_audio_tokens
    # BigVGAN upsamples 240x; the DiT repeats each code twice -> 480 samples per code.
    assert res.waveform.size == 480 * res.info["audio_tokens"]


def test_same_seed_same_audio_other_seed_other_audio(adapter, requests_, config):
    a = adapter.generate(requests_[:1], config)[0]
    b = adapter.generate(requests_[:1], config)[0]
    c = adapter.generate(requests_[:1], config.model_copy(update={"seed": 1}))[0]
    assert torch.equal(torch.from_numpy(a.waveform), torch.from_numpy(b.waveform))
    assert not torch.equal(torch.from_numpy(a.waveform), torch.from_numpy(c.waveform))
    assert a.info["audio_codes"] == c.info["audio_codes"]  # the seed only drives token2wav's noise


def test_batch_rows_equal_solo_runs(adapter, requests_, config):
    """Text and codes are exact; audio is bit-exact with token2wav row by row (the default), and equal
    up to the rounding of batched kernels with token2wav_batch."""
    rowwise, config = config, config.model_copy(update={"options": {**config.options, "token2wav_batch": 4}})
    batch, batch_rowwise = adapter.generate(requests_, config), adapter.generate(requests_, rowwise)
    for req, row, row1 in zip(requests_, batch, batch_rowwise, strict=True):
        (solo,) = adapter.generate([req], config)
        assert row.id == req.id and row.text == solo.text == row1.text
        assert row.info["audio_codes"] == solo.info["audio_codes"] == row1.info["audio_codes"]
        assert torch.equal(torch.from_numpy(row1.waveform), torch.from_numpy(solo.waveform))
        assert np.linalg.norm(row.waveform - solo.waveform) <= 1e-5 * np.linalg.norm(solo.waveform)


def test_stream_roots_see_ids_and_mask_every_step(adapter, requests_, config):
    specs = adapter.stream_specs()
    assert specs["lm"].stop_token_ids == (adapter.tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                          adapter.tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    talker = adapter.model.config.talker_config
    assert specs["synth"].stop_token_ids == (talker.tts_codec_pad_token_id, talker.tts_codec_end_token_id)
    calls = {"lm": [], "synth": []}

    def spy(stream):
        def pre(module, args, kwargs):
            ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
            calls[stream].append((None if ids is None else ids.shape, mask.shape, kwargs.get("inputs_embeds") is not None))
        return pre

    hooks = [adapter.model.get_submodule(specs[s].root).register_forward_pre_hook(spy(s), with_kwargs=True) for s in calls]
    try:
        res = adapter.generate(requests_, config)
    finally:
        for h in hooks:
            h.remove()
    lm, synth = calls["lm"], calls["synth"]
    assert lm[0][0] == lm[0][1] and lm[0][0][1] > 1  # prefill: ids and mask [B, prompt]
    assert all(ids == (2, 1) and mask[0] == 2 for ids, mask, _ in lm[1:])  # decode: one id per row
    assert len(lm) == max(r.info["text_tokens"] for r in res) + (0 if max(r.info["text_tokens"] for r in res) == 10 else 1)
    assert synth[0][0] is None and synth[0][2] and synth[0][1][1] == lm[0][1][1] + 2  # prefill on embeddings
    assert all(ids == (2, 1) for ids, _, _ in synth[1:])
    # generate stopped on the spec's stop ids: at most one call past the longest codec sequence
    assert len(synth) <= max(r.info["audio_tokens"] for r in res) + 1


def test_unknown_speaker_and_option(adapter, requests_, config):
    with pytest.raises(EsnError, match=r"unknown speaker 'Nobody'.*Chelsie, Ethan"):
        adapter.generate(requests_[:1], GenerationConfig(speaker="Nobody"))
    with pytest.raises(EsnError, match="unknown qwen_omni option"):
        adapter.generate(requests_[:1], GenerationConfig(options={"beams": 3}))
    assert adapter.generate([], config) == []


def test_system_prompt_presets_change_the_prompt(adapter, speech_fn):
    from esn.adapters import CONVERSION_SYSTEM_PROMPT as CONVERSION_PROMPT
    from esn_qwen_omni.prompt import SPEECH_PROMPT, system_prompt

    assert system_prompt(None) == SPEECH_PROMPT and system_prompt("conversion") == CONVERSION_PROMPT
    assert system_prompt("Be brief.") == "Be brief."
    req = EVCRequest(speech_fn(0.5, 2), "angry")
    a = adapter.prompts.batch([req.audio], SPEECH_PROMPT, ["x"], ["r"]).tensors["input_ids"]
    b = adapter.prompts.batch([req.audio], CONVERSION_PROMPT, ["x"], ["r"]).tensors["input_ids"]
    assert a.shape != b.shape
    n_audio = int((a == adapter.model.config.thinker_config.audio_token_index).sum())
    assert n_audio == 12  # 0.5 s: 50 log-mel frames -> (50 - 1) // 2 + 1 = 25 -> (25 - 2) // 2 + 1 = 12


def test_too_long_and_too_short_audio(adapter, speech_fn, config):
    with pytest.raises(EsnError, match="at most 30 s"):
        adapter.generate([EVCRequest(speech_fn(31, 0), "happy")], config)
    with pytest.raises(EsnError, match="too short"):
        adapter.generate([EVCRequest(speech_fn(0.01, 0), "happy")], config)


def test_token2wav_batch_keeps_text_codes_and_each_rows_audio(adapter, speech_fn):
    import torch
    from esn.adapters import EVCRequest, GenerationConfig

    fixed = {"talker_min_new_tokens": 12, "token2wav_num_steps": 2}
    config = GenerationConfig(max_new_tokens=6, max_audio_tokens=12, options={**fixed, "token2wav_batch": 1})
    batched = config.model_copy(update={"options": {**fixed, "token2wav_batch": 4}})
    by_default = adapter.generate([EVCRequest(speech_fn(1.0, i), "angry", id=str(i)) for i in range(3)],
                                  config.model_copy(update={"options": fixed}))  # default: row by row
    reqs = [EVCRequest(speech_fn(1.0, i), "angry", id=str(i)) for i in range(3)]
    rowwise = adapter.generate(reqs, config)
    grouped = adapter.generate(reqs, batched)
    assert [r.text for r in grouped] == [r.text for r in rowwise]
    assert [r.info["audio_codes"] for r in grouped] == [r.info["audio_codes"] for r in rowwise]
    assert len({len(r.info["audio_codes"]) for r in grouped}) == 1  # one group of three
    assert all(np.array_equal(d.waveform, r.waveform) for d, r in zip(by_default, rowwise, strict=True))
    for g, r in zip(grouped, rowwise, strict=True):  # each row keeps its solo noise: only rounding differs
        assert g.waveform.dtype == r.waveform.dtype and g.waveform.shape == r.waveform.shape
        assert np.linalg.norm(g.waveform - r.waveform) <= 1e-4 * np.linalg.norm(r.waveform)
    # decoding after generate() must not build an autograd graph (40 DiT passes would keep every activation)
    probe = []
    handle = adapter.model.token2wav.code2wav_dit_model.register_forward_hook(
        lambda m, a, out: probe.append(torch.is_grad_enabled() or out.requires_grad)
    )
    try:
        again = adapter.generate(reqs, batched)
    finally:
        handle.remove()
    assert probe and not any(probe)
    assert all(torch.equal(torch.from_numpy(a.waveform), torch.from_numpy(b.waveform)) for a, b in zip(again, grouped, strict=True))
    pairs = adapter.generate(reqs, config.model_copy(update={"options": {**fixed, "token2wav_batch": 2}}))
    assert [r.info["audio_codes"] for r in pairs] == [r.info["audio_codes"] for r in rowwise]
    with pytest.raises(EsnError, match="token2wav_batch must be >= 1"):
        adapter.generate(reqs[:1], config.model_copy(update={"options": {**fixed, "token2wav_batch": 0}}))
    solo_rowwise = adapter.generate(reqs[:1], config)[0]
    solo_grouped = adapter.generate(reqs[:1], batched)[0]
    assert torch.equal(torch.from_numpy(solo_grouped.waveform), torch.from_numpy(solo_rowwise.waveform))


def test_batched_dit_sample_equals_transformers_sample_for_one_row(adapter):
    """``_dit_sample`` re-states transformers' ``sample`` to give each row its solo noise; at one row it
    must be ``sample`` bit for bit (guards against a transformers change in the ODE)."""
    import torch
    from esn_qwen_omni.adapter import _dit_sample

    dit = adapter.model.token2wav.code2wav_dit_model
    gen = torch.Generator().manual_seed(3)
    code = torch.randint(0, 50, (1, 12), generator=gen)
    cond = torch.randn(1, dit.config.enc_emb_dim, generator=gen)
    mel = torch.randn(1, 30, dit.mel_dim, generator=gen)
    with torch.inference_mode():
        for steps, guidance in ((3, 0.5), (2, 0.0)):
            torch.manual_seed(7)
            ref = dit.sample(cond, mel, code, num_steps=steps, guidance_scale=guidance)
            assert torch.equal(
                _dit_sample(dit, cond, mel, code, 7, num_steps=steps, guidance_scale=guidance), ref
            )
        two = _dit_sample(dit, cond.repeat(2, 1), mel.repeat(2, 1, 1), code.repeat(2, 1), 7, num_steps=3)
    torch.testing.assert_close(two[0], two[1], rtol=0, atol=0)  # same inputs, same noise: same rows


def test_token2wav_tf32_option_is_scoped_and_checked(adapter, speech_fn):
    import torch

    fixed = {"talker_min_new_tokens": 4, "token2wav_num_steps": 2}
    config = GenerationConfig(max_new_tokens=4, max_audio_tokens=4, options=fixed)
    reqs = [EVCRequest(speech_fn(0.5, 0), "sad")]
    plain = adapter.generate(reqs, config)[0]
    before = torch.backends.cuda.matmul.allow_tf32
    for on in (True, "on", "TRUE", 1):
        out = adapter.generate(reqs, config.model_copy(update={"options": {**fixed, "token2wav_tf32": on}}))[0]
        assert np.array_equal(out.waveform, plain.waveform)  # TF32 is a CUDA mode: nothing changes on CPU
        assert torch.backends.cuda.matmul.allow_tf32 == before
    for bad in ("maybe", 2, None):
        with pytest.raises(EsnError, match=r"token2wav_tf32=.* must be true or false"):
            adapter.generate(reqs, config.model_copy(update={"options": {**fixed, "token2wav_tf32": bad}}))
