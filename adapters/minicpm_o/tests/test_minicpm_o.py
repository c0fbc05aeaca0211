"""esn-minicpm-o on its tiny remote-code stand-in, loaded through AutoModel.from_pretrained(trust_remote_code)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from esn.adapters import GenerationConfig
from esn.errors import EsnError
from esn.testing import CHECKS, tiny_config, tiny_requests
from esn_minicpm_o import MiniCPMOAdapter
from esn_minicpm_o.adapter import NoAudioWarning


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds contention
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return MiniCPMOAdapter.write_tiny(tmp_path_factory.mktemp("minicpmo") / "ck")


@pytest.fixture(scope="module")
def adapter(tiny_dir):
    return MiniCPMOAdapter.load(tiny_dir, dtype="float32", trust_remote_code=True)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_conformance(adapter, check):
    check(adapter)


def test_tiny_checkpoint_is_remote_code(tiny_dir, adapter):
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_minicpmo.MiniCPMO"
    assert (tiny_dir / "modeling_minicpmo.py").is_file() and (tiny_dir / "model.safetensors").is_file()
    # loaded from the copy transformers made of the checkpoint's code, not from this package
    assert type(adapter.model).__module__.startswith("transformers_modules.")
    assert not isinstance(adapter.model.tts.audio_tokenizer, torch.nn.Module)


def test_hook_points_follow_the_module_tree(adapter):
    points = adapter.hook_points()
    assert [hp.name for hp in points] == [f"lm.layers.{i}.mlp.gate" for i in range(3)] + [
        f"synth.layers.{i}.mlp.gate" for i in range(2)]
    assert points[0].module == "llm.model.layers.0.mlp.act_fn" and points[0].width == 48
    assert points[3].module == "tts.model.layers.0.mlp.act_fn" and points[3].width == 40
    assert type(adapter.model.llm).__name__ == "Qwen3ForCausalLM"
    assert type(adapter.model.tts.model).__name__ == "LlamaModel"


def test_text_is_greedy_and_audio_is_seeded(adapter):
    request = tiny_requests(1)
    a = adapter.generate(request, tiny_config(seed=0))[0]
    b = adapter.generate(request, tiny_config(seed=0))[0]
    c = adapter.generate(request, tiny_config(seed=1))[0]
    assert a.text and a.text == b.text == c.text  # text does not depend on the seed
    assert np.array_equal(a.waveform, b.waveform)  # audio does, and is reproducible under one seed
    assert not np.array_equal(a.waveform, c.waveform)
    assert a.sample_rate == 24_000 and a.info["tts_sampled"] is True


def test_tts_temperature_option(adapter):
    request = tiny_requests(1)
    cold = adapter.generate(request, tiny_config(options={"tts_temperature": 0.05}))[0]
    assert cold.waveform.size > 0
    with pytest.raises(EsnError, match="tts_temperature must be > 0"):
        adapter.generate(request, tiny_config(options={"tts_temperature": 0}))
    with pytest.raises(EsnError, match="no speaker choice"):
        adapter.generate(request, tiny_config(speaker="Chelsie"))
    with pytest.raises(EsnError, match="unknown minicpm_o option 'beams'"):
        adapter.generate(request, tiny_config(options={"beams": 2}))


def test_enable_thinking_reads_false_as_false(adapter):
    assert adapter._options({"enable_thinking": "false"}) == {"enable_thinking": False}  # bool("false") is True
    assert adapter._options({"enable_thinking": True}) == {"enable_thinking": True}
    with pytest.raises(EsnError, match="enable_thinking='maybe' must be true or false"):
        adapter._options({"enable_thinking": "maybe"})


def test_swallowed_tts_error_is_reported(adapter, capfd):
    tokenizer = adapter.model.tts.audio_tokenizer
    adapter.model.tts.audio_tokenizer = None  # like a missing CosyVoice2: chat() prints and carries on
    try:
        with pytest.warns(NoAudioWarning, match="no audio"):
            result = adapter.generate(tiny_requests(1), tiny_config())[0]
    finally:
        adapter.model.tts.audio_tokenizer = tokenizer
    assert result.text and result.waveform.size == 0 and result.waveform.dtype == np.float32
    assert "no audio" in result.info["error"]
    assert "Traceback" in capfd.readouterr().err


def test_loading_errors(tiny_dir, tmp_path, monkeypatch):
    with pytest.raises(EsnError, match="trust_remote_code=True"):
        MiniCPMOAdapter.load(tiny_dir)
    with pytest.raises(EsnError, match="dtype 'int8'"):
        MiniCPMOAdapter.load(tiny_dir, dtype="int8", trust_remote_code=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(EsnError, match="not MiniCPM-o"):
        MiniCPMOAdapter.load(other, trust_remote_code=True)
    with pytest.raises(EsnError, match=r"no config\.json"):
        MiniCPMOAdapter.load(tmp_path, trust_remote_code=True)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(EsnError, match=r"transformers==4\.51\.0"):
        MiniCPMOAdapter.load(tiny_dir, trust_remote_code=True)


def test_remote_code_failure_names_the_versions(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny_dir.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / "modeling_minicpmo.py").write_text("from transformers import NoSuchClass\n")
    with pytest.raises(EsnError, match=r"written for transformers 4\.51\.0, torch <= 2\.8") as info:
        MiniCPMOAdapter.load(broken, trust_remote_code=True)
    assert "pip install" in str(info.value)


def test_plugin_lists_without_heavy_imports():
    code = ("import sys, esn_minicpm_o.plugin as p; from esn.plugins import registry_with; "
            "r = registry_with(p); a = r.adapters['minicpm_o']; "
            "print(a.streams, a.architectures, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "('lm', 'synth') ('MiniCPMO',) False"


def test_write_tiny_refuses_a_used_directory(tiny_dir):
    with pytest.raises(EsnError, match="not empty"):
        MiniCPMOAdapter.write_tiny(tiny_dir)


def test_system_prompt_presets(adapter):
    request = tiny_requests(1)[0]
    default = adapter.messages(request, GenerationConfig())
    assert default[0]["content"][0].startswith("You are a helpful assistant")
    assert adapter.messages(request, GenerationConfig(system_prompt="conversion"))[0]["content"][0].startswith(
        "You are an emotional voice conversion system")
    user = default[1]["content"]
    assert user[0] is request.audio and "happy" in user[1]
