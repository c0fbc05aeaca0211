"""Loading, the tiny checkpoint, hook points and EVC generation of esn-qwen3-omni."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from esn.adapters import EVCRequest, GenerationConfig
from esn.errors import EsnError


def test_plugin_import_is_cheap_and_registers():
    code = ("import sys, esn_qwen3_omni.plugin as p; from esn_qwen3_omni import Qwen3OmniAdapter as A; "
            "print(A.name, A.streams, 'transformers' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "qwen3_omni" and out[-2:] == ["False", "False"]


def test_tiny_checkpoint_is_small_finite_and_fully_initialised(tiny_dir, adapter):
    size = sum(f.stat().st_size for f in tiny_dir.iterdir())
    assert size < 3_000_000
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3OmniMoeForConditionalGeneration"]
    params = dict(adapter.model.named_parameters())
    assert all(bool(torch.isfinite(p).all()) for p in params.values())
    # the talker's routed experts and routers, which transformers leaves unset, hold random values
    for name in ("talker.model.layers.0.mlp.experts.gate_up_proj", "talker.model.layers.1.mlp.experts.down_proj",
                 "talker.model.layers.0.mlp.gate.weight"):
        assert 0.01 < float(params[name].detach().std()) < 0.05, name


def test_hook_points_follow_the_checkpoint(adapter):
    layout = adapter.layout()
    assert layout.names == [
        "lm.layers.0.mlp.gate", "lm.layers.1.mlp.gate", "lm.layers.2.mlp.gate",
        "synth.layers.0.mlp.gate", "synth.layers.0.mlp.shared_expert.gate",
        "synth.layers.1.mlp.gate", "synth.layers.1.mlp.shared_expert.gate",
        "synth.layers.2.mlp.gate", "synth.layers.3.mlp.gate"]
    kinds = [(hp.experts, hp.top_k, hp.unit_width, hp.flat) for hp in layout]
    assert kinds == [(8, 2, 16, False), (0, 0, 64, False), (8, 2, 16, False), (6, 2, 8, False), (0, 0, 16, True),
                     (6, 2, 8, False), (0, 0, 16, True), (0, 0, 40, False), (0, 0, 40, False)]
    assert layout["lm.layers.0.mlp.gate"].router == "thinker.model.language_model.layers.0.mlp.experts"
    assert layout["synth.layers.2.mlp.gate"].module == "talker.code_predictor.model.layers.0.mlp.act_fn"
    assert layout.n_groups == 8 + 1 + 8 + (6 + 1) * 2 + 2
    assert adapter.checkpoint_streams == ("lm", "synth")
    assert adapter.stream_specs()["synth"].substeps == ("talker.code_predictor",)


def test_load_refuses_other_models_and_damaged_checkpoints(tiny_dir, tmp_path):
    import shutil

    from esn_qwen3_omni import Qwen3OmniAdapter
    from safetensors.torch import load_file, save_file

    with pytest.raises(EsnError, match="not found"):
        Qwen3OmniAdapter.load(tmp_path / "missing")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["Qwen2_5OmniForConditionalGeneration"]}))
    with pytest.raises(EsnError, match="pick the adapter"):
        Qwen3OmniAdapter.load(other)
    # a checkpoint saved with uninitialised (non-finite) talker experts is refused
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    weights = next(broken.glob("*.safetensors"))
    tensors = load_file(weights)
    key = "talker.model.layers.1.mlp.experts.0.down_proj.weight"  # saved per expert, fused when loaded
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(EsnError, match=r"NaN or inf values .*talker\.model\.layers\.1\.mlp\.experts\.down_proj"):
        Qwen3OmniAdapter.load(broken, dtype="float32")
    # a checkpoint missing a weight is refused (transformers would fill it with random values)
    del tensors[key]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(EsnError, match="missing"):
        Qwen3OmniAdapter.load(broken, dtype="float32")


def test_generate_returns_text_and_24khz_speech_batched_equal_to_solo(adapter, requests_, config):
    results = adapter.generate(requests_, config)
    assert [r.id for r in results] == ["a", "b"]
    for r, request in zip(results, requests_, strict=True):
        assert r.sample_rate == 24_000 and r.waveform.dtype == np.float32 and r.waveform.size > 0
        assert np.all(np.isfinite(r.waveform)) and np.abs(r.waveform).max() > 1e-3  # audible
        assert isinstance(r.text, str) and r.info["speaker"] == "ethan"
        solo = adapter.generate([request], config)[0]
        assert solo.text == r.text and np.array_equal(solo.waveform, r.waveform)


def test_options_speakers_and_bad_input(adapter, requests_, config, speech_fn):
    with pytest.raises(EsnError, match="unknown speaker"):
        adapter.generate(requests_[:1], config.model_copy(update={"speaker": "Nobody"}))
    with pytest.raises(EsnError, match="unknown qwen3_omni option"):
        adapter.generate(requests_[:1], config.model_copy(update={"options": {"beam": 2}}))
    with pytest.raises(EsnError, match="experts_implementation='sonicmoe' must be one of"):
        adapter.generate(requests_[:1], config.model_copy(update={"options": {"experts_implementation": "sonicmoe"}}))
    with pytest.raises(EsnError, match="too short"):
        adapter.generate([EVCRequest(speech_fn(0.01, 0), "happy", id="s")], config)
    chelsie = adapter.generate(requests_[:1], config.model_copy(update={"speaker": "Chelsie"}))[0]
    assert chelsie.info["speaker"] == "chelsie"
    # the experts implementation option applies to one call and is restored
    before = adapter.model.get_experts_implementation()
    eager = config.model_copy(update={"options": {**config.options, "experts_implementation": "eager"}})
    assert adapter.generate(requests_[:1], eager)[0].text == adapter.generate(requests_[:1], config)[0].text
    assert adapter.model.get_experts_implementation() == before


def test_cli_writes_and_lists_the_tiny_checkpoint(tmp_path, capsys):
    from esn.cli import main

    assert main(["adapters", "tiny", "qwen3_omni", str(tmp_path / "t")]) == 0
    assert main(["hookpoints", "--adapter", "qwen3_omni", "--model", str(tmp_path / "t"), "--json"]) == 0
    text = capsys.readouterr().out
    out = json.loads(text[text.index("{"):])
    first = out["hook_points"][0]
    assert first == {"name": "lm.layers.0.mlp.gate", "width": 128, "experts": 8, "top_k": 2,
                     "module": "thinker.model.language_model.layers.0.mlp.experts.act_fn"} or (
        first["experts"] == 8 and first["top_k"] == 2 and first["width"] == 128)
    assert main(["hookpoints", "--adapter", "qwen3_omni", "--model", str(tmp_path / "t")]) == 0
    assert "8 x 16, top 2" in capsys.readouterr().out
    assert GenerationConfig().max_new_tokens > 0
