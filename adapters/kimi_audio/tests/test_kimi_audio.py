"""esn-kimi-audio on its tiny stand-in (remote-code ALM with real Qwen2 layers + KimiAudio wrapper)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from esn.adapters import GenerationConfig
from esn.errors import EsnError
from esn.hooks import has_hooks
from esn.testing import CHECKS, tiny_config, tiny_requests
from esn_kimi_audio import KimiAudioAdapter
from esn_kimi_audio.adapter import NoAudioWarning

SAMPLES_PER_TOKEN = 1920  # 12.5 speech tokens per second at 24 kHz


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds contention
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return KimiAudioAdapter.write_tiny(tmp_path_factory.mktemp("kimia") / "ck")


@pytest.fixture(scope="module")
def adapter(tiny_dir):
    return KimiAudioAdapter.load(tiny_dir, trust_remote_code=True)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_conformance(adapter, check):
    check(adapter)


def test_alm_is_loaded_as_remote_code(tiny_dir, adapter):
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_moonshot_kimia.MoonshotKimiaForCausalLM"
    assert type(adapter.kimia.alm).__module__.startswith("transformers_modules.")
    assert adapter.architecture == "MoonshotKimiaForCausalLM"


def test_hook_points_record_the_mimo_branch(adapter):
    points = adapter.hook_points()
    lm = [hp for hp in points if hp.stream == "lm"]
    synth = [hp for hp in points if hp.stream == "synth"]
    assert [hp.module for hp in lm] == [f"alm.model.layers.{i}.mlp.act_fn" for i in range(4)]
    assert [hp.module for hp in synth] == [f"alm.model.mimo_layers.{i}.mlp.act_fn" for i in range(2)]
    assert adapter.branch_layer == 2
    assert [hp.meta["feeds"] for hp in lm] == ["text+audio"] * 3 + ["text"]
    assert all(hp.meta == {"mimo_branch_after_layer": 2, "feeds": "audio"} for hp in synth)
    assert type(adapter.kimia.alm.model.layers[0]).__name__ == "Qwen2DecoderLayer"


def test_greedy_and_length_caps(adapter):
    request = tiny_requests(1)
    a = adapter.generate(request, tiny_config(max_new_tokens=5, max_audio_tokens=7, seed=0))[0]
    b = adapter.generate(request, tiny_config(max_new_tokens=5, max_audio_tokens=7, seed=1))[0]
    # greedy tokens: same text and length for any seed; only the detokenizer's noise follows the seed
    assert a.text == b.text and len(a.text) <= 5
    assert a.waveform.size == b.waveform.size == 7 * SAMPLES_PER_TOKEN
    assert not np.array_equal(a.waveform, b.waveform)
    assert a.info["audio_capped_at_step"] == 6 + 7 and a.info["text_capped_at_step"] == 5
    assert not has_hooks(adapter.model)


def test_sampling_options(adapter):
    hot = adapter.generate(tiny_requests(1), tiny_config(options={"audio_temperature": 0.8, "audio_top_k": 10}))[0]
    assert hot.waveform.size > 0
    with pytest.raises(EsnError, match="no speaker choice"):
        adapter.generate(tiny_requests(1), tiny_config(speaker="Chelsie"))
    with pytest.raises(EsnError, match="unknown kimi_audio option 'temperature'"):
        adapter.generate(tiny_requests(1), tiny_config(options={"temperature": 0.0}))
    with pytest.raises(EsnError, match="must be >= 0"):
        adapter.generate(tiny_requests(1), tiny_config(options={"text_temperature": -1}))


def test_no_audio_is_reported(adapter):
    weight = adapter.kimia.alm.mimo_output.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.zero_()  # all audio logits equal: argmax is id 0, <|im_msg_end|>, so speech ends at once
    try:
        with pytest.warns(NoAudioWarning, match="no audio"):
            result = adapter.generate(tiny_requests(1), tiny_config())[0]
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert result.waveform.size == 0 and result.waveform.dtype == np.float32
    assert "no audio" in result.info["error"]


def test_chats_have_no_system_role(adapter):
    request = tiny_requests(1)[0]
    plain = adapter.chats(request, GenerationConfig(), "/x.wav")
    assert [(m["role"], m["message_type"]) for m in plain] == [("user", "audio"), ("user", "text")]
    assert plain[0]["content"] == "/x.wav" and "happy" in plain[1]["content"]
    sys_chat = adapter.chats(request, GenerationConfig(system_prompt="conversion"), "/x.wav")
    assert sys_chat[0]["message_type"] == "text" and sys_chat[0]["content"].startswith("You are an emotional")


def test_loading_errors(tiny_dir, tmp_path):
    with pytest.raises(EsnError, match="trust_remote_code=True"):
        KimiAudioAdapter.load(tiny_dir)
    with pytest.raises(EsnError, match="attn_implementation"):
        KimiAudioAdapter.load(tiny_dir, attn_implementation="sdpa", trust_remote_code=True)
    # a checkpoint without the stand-in marker needs the real kimia_infer, which is not installed here
    real = tmp_path / "real"
    real.mkdir()
    (real / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(EsnError, match=r"not on PyPI.*github\.com/MoonshotAI/Kimi-Audio"):
        KimiAudioAdapter.load(real, trust_remote_code=True)
    (real / "esn_standin.json").write_text(json.dumps({"kimia_module": "os"}))
    with pytest.raises(EsnError, match="not a stand-in of this package"):
        KimiAudioAdapter.load(real, trust_remote_code=True)
    (real / "config.json").write_text(json.dumps({"architectures": ["MiniCPMO"]}))
    with pytest.raises(EsnError, match="not Kimi-Audio"):
        KimiAudioAdapter.load(real, trust_remote_code=True)


def test_plugin_lists_without_heavy_imports():
    code = ("import sys, esn_kimi_audio.plugin as p; from esn.plugins import registry_with; "
            "r = registry_with(p); a = r.adapters['kimi_audio']; "
            "print(a.streams, a.architectures, 'transformers' in sys.modules, 'kimia_infer' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "('lm', 'synth') ('MoonshotKimiaForCausalLM',) False False"
