"""esn-minicpm-o on its tiny remote-code stand-in, loaded through AutoModel.from_pretrained(trust_remote_code)."""

from __future__ import annotations

import json
import shutil
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


def variant(tiny_dir, directory, *, tts=None, **config):
    """A copy of the tiny checkpoint with some config.json fields (``tts``: fields of ``tts_config``) changed;
    a value of None deletes the field."""
    shutil.copytree(tiny_dir, directory)
    data = json.loads((directory / "config.json").read_text())
    for table, changes in ((data, config), (data["tts_config"], tts or {})):
        for key, value in changes.items():
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
    (directory / "config.json").write_text(json.dumps(data, indent=2))
    return directory


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
    broken = variant(tiny_dir, tmp_path / "broken")
    (broken / "modeling_minicpmo.py").write_text("from transformers import NoSuchClass\n")
    with pytest.raises(EsnError, match=r"written for transformers 4\.51\.0, torch <= 2\.8\.0") as info:
        MiniCPMOAdapter.load(broken, trust_remote_code=True)
    assert "pip install transformers==4.51.0" in str(info.value)


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


# -- upstream fidelity (issue #17): each test fails on the adapter before the fix --------------------------


def test_hub_id_loads_the_vocoder_from_the_downloaded_snapshot(tiny_dir, tmp_path, monkeypatch):
    """Point 1: init_tts() builds its CosyVoice2 path from config._name_or_path, which is the hub id itself
    when the model is loaded by id. The adapter downloads the snapshot first and loads from there.
    (The hub is a local cache in offline mode here, laid out as huggingface_hub lays it out.)"""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--esn-test--tiny-minicpmo"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    adapter = MiniCPMOAdapter.load("esn-test/tiny-minicpmo", dtype="float32", trust_remote_code=True)
    assert adapter.source == "esn-test/tiny-minicpmo"
    assert adapter.model.config._name_or_path == str(repo / "snapshots" / commit)
    assert adapter.model.tts.audio_tokenizer.sample_rate == 24_000
    with pytest.raises(EsnError, match=r"could not fetch esn-test/no-such-model from the Hugging Face hub"):
        MiniCPMOAdapter.load("esn-test/no-such-model", trust_remote_code=True)


def test_published_code_needs_its_transformers_range(tiny_dir, tmp_path):
    """Point 4: the remote code reads past_key_values.seen_tokens (gone in transformers 4.54) and
    minicpmo-utils pins <4.53; the whole range is checked before loading, not only the major version."""
    published = variant(tiny_dir, tmp_path / "published")
    (published / "esn_standin.json").unlink()  # now the adapter treats it as the published checkpoint
    import transformers

    with pytest.raises(EsnError, match=r"transformers>=4\.51\.0,<4\.53 \(you have " + transformers.__version__) as info:
        MiniCPMOAdapter.load(published, dtype="float32", trust_remote_code=True)
    message = str(info.value)
    assert "seen_tokens" in message and "pip install transformers==4.51.0" in message
    assert "\n" not in message


def test_an_error_inside_chat_is_an_esn_error_naming_the_cause(tiny_dir, tmp_path):
    """Point 4: the stand-in reads the cache length through seen_tokens as the published code does; on this
    transformers that attribute is gone and chat() raises. The adapter turns that into one EsnError."""
    old_api = variant(tiny_dir, tmp_path / "seen_tokens", standin_cache_length_from="seen_tokens")
    adapter = MiniCPMOAdapter.load(old_api, dtype="float32", trust_remote_code=True)
    with pytest.raises(EsnError, match=r"chat\(\) failed on request c0: AttributeError: .*seen_tokens") as info:
        adapter.generate(tiny_requests(1), tiny_config())
    assert "written for transformers 4.51.0" in str(info.value)


@pytest.mark.parametrize("tts,match", [
    ({"condition_type": "llm_hidden"}, r"condition_type is 'llm_hidden'.*only for 'hidden_text_merge'"),
    ({"s3_stream_generate": None}, r"tts_config has no s3_stream_generate"),
    ({"s3_stream_generate": True}, r"s3_stream_generate is true, but the installed vocoder .* has no inference_token2wav"),
], ids=["condition_type", "no_s3_stream_generate", "s3_stream_generate"])
def test_tts_switches_chat_cannot_follow_are_refused_at_load(tiny_dir, tmp_path, tts, match):
    """Point 8: chat() picks its speech path from tts_config (condition_type, s3_stream_generate) and
    swallows the error of a path it cannot take: every conversion would come back silent."""
    with pytest.raises(EsnError, match=match):
        MiniCPMOAdapter.load(variant(tiny_dir, tmp_path / "v", tts=tts), dtype="float32", trust_remote_code=True)


def test_the_vocoder_call_is_recorded(adapter):
    result = adapter.generate(tiny_requests(1), tiny_config())[0]
    assert adapter.vocoder_call == "token2wav" and result.info["vocoder_call"] == "token2wav"


def test_the_swallowed_error_is_named_in_the_result(adapter):
    tokenizer = adapter.model.tts.audio_tokenizer
    adapter.model.tts.audio_tokenizer = None
    try:
        with pytest.warns(NoAudioWarning):
            result = adapter.generate(tiny_requests(1), tiny_config())[0]
    finally:
        adapter.model.tts.audio_tokenizer = tokenizer
    assert "caught and printed AttributeError: 'NoneType' object has no attribute 'token2wav'" in result.info["error"]


def test_a_checkpoint_without_its_vocoder_is_refused(tiny_dir, tmp_path):
    bare = variant(tiny_dir, tmp_path / "bare")
    shutil.rmtree(bare / "assets")
    with pytest.raises(EsnError, match=r"no assets/CosyVoice2-0\.5B/"):
        MiniCPMOAdapter.load(bare, dtype="float32", trust_remote_code=True)


def test_the_model_extra_pins_what_the_adapter_checks():
    """pyproject's "model" extra installs the PyPI part of the requirements that load() and
    `esn adapters check` enforce, with the same pins."""
    import tomllib
    from pathlib import Path

    from esn_minicpm_o.adapter import REQUIREMENTS

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    pypi = [r.pip_argument for r in REQUIREMENTS if not r.pip_options and "+" not in r.pip_argument]
    assert pyproject["project"]["optional-dependencies"]["model"] == pypi
