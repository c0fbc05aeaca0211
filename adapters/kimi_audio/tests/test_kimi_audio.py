"""esn-kimi-audio on its tiny stand-in (remote-code ALM with real Qwen2 layers + KimiAudio wrapper)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from esn.adapters import EVCRequest, GenerationConfig
from esn.errors import EsnError
from esn.hooks import has_hooks
from esn.testing import CHECKS, speech_like, tiny_config, tiny_requests
from esn_kimi_audio import KimiAudioAdapter
from esn_kimi_audio.adapter import BudgetWarning, NoAudioWarning

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


def published(tiny_dir, tmp_path):
    """The tiny checkpoint without its stand-in marker: the adapter then loads it with the real kimia_infer."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "config.json").write_text((tiny_dir / "config.json").read_text())
    return real


class FakeCuda:
    """Two CUDA devices, current device 1, as torch.cuda reports them (this machine has none)."""

    def __init__(self, monkeypatch):
        self.selected = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
        monkeypatch.setattr(torch.cuda, "set_device", self.selected.append)


@pytest.fixture(scope="module")
def adapter(tiny_dir):
    # float32, not the published bf16: the bf16 Whisper features then need the adapter's cast (point 3)
    return KimiAudioAdapter.load(tiny_dir, dtype="float32", trust_remote_code=True)


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


def test_chats_have_no_system_role(adapter):
    request = tiny_requests(1)[0]
    plain = adapter.chats(request, GenerationConfig(), "/x.wav")
    assert [(m["role"], m["message_type"]) for m in plain] == [("user", "text"), ("user", "audio")]
    assert plain[1]["content"] == "/x.wav" and "happy" in plain[0]["content"]
    sys_chat = adapter.chats(request, GenerationConfig(system_prompt="conversion"), "/x.wav")
    assert sys_chat[0]["message_type"] == "text" and sys_chat[0]["content"].startswith("You are an emotional")
    assert sys_chat[-1]["message_type"] == "audio"


def test_loading_errors(tiny_dir, tmp_path):
    with pytest.raises(EsnError, match="trust_remote_code=True"):
        KimiAudioAdapter.load(tiny_dir)
    with pytest.raises(EsnError, match="attn_implementation"):
        KimiAudioAdapter.load(tiny_dir, attn_implementation="sdpa", trust_remote_code=True)
    real = published(tiny_dir, tmp_path)
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


# -- upstream fidelity (issue #17): each test fails on the adapter before the fix --------------------------


def test_the_audio_ends_the_turn_so_the_prompt_asks_for_speech(adapter):
    """Point 2: kimia_infer adds <|im_kimia_speech_ctd_id|> only after an audio message that ends the user
    turn; with the instruction after the audio the model never gets its speech-output prompt."""
    from esn.hooks import installed

    x = adapter.kimia.extra_tokens
    prompts = []

    def first_call(module, args, kwargs):  # the prefill: input_ids [1, prompt] audio-stream ids
        if not prompts:
            prompts.append(kwargs["input_ids"][0].tolist())

    with installed([(adapter.kimia.alm.model, first_call)], kind="pre", with_kwargs=True):
        adapter.generate(tiny_requests(1), tiny_config(max_new_tokens=2, max_audio_tokens=2))
    ids = prompts[0]
    assert x.kimia_speech_ctd_id in ids and x.kimia_speech_ct_id not in ids
    assert ids[ids.index(x.media_end) + 1] == x.kimia_speech_ctd_id  # right after the audio, as in "both" mode
    assert ids[-2:] == [x.msg_end, x.kimia_assistant_msg_start]


@pytest.mark.parametrize("dtype,expected", [("float32", torch.float32), ("auto", torch.bfloat16)])
def test_bf16_whisper_features_reach_an_alm_of_any_dtype(tiny_dir, adapter, dtype, expected):
    """Point 3: the Whisper features are bf16 and reach vq_adaptor uncast; an ALM in float32 (or float16)
    failed on the first audio forward. "auto" keeps kimia_infer's own bf16."""
    from esn.hooks import installed

    model = adapter if dtype == "float32" else KimiAudioAdapter.load(tiny_dir, dtype=dtype, trust_remote_code=True)
    assert model.kimia.alm.dtype == expected
    seen = []
    with installed([(model.kimia.alm.model.vq_adaptor, lambda m, a: seen.append(a[0].dtype))], kind="pre"):
        result = model.generate(tiny_requests(1), tiny_config(max_new_tokens=2, max_audio_tokens=3))[0]
    assert seen == [torch.bfloat16]  # what kimia_infer hands over; the adapter's cast runs after this observer
    assert result.waveform.size == 3 * SAMPLES_PER_TOKEN and not has_hooks(model.model)


def test_zero_audio_tokens_never_reach_the_detokenizer(adapter):
    """Point 5: with zero speech tokens kimia_infer still calls its detokenizer, which fails; the adapter
    answers an empty waveform and a NoAudioWarning instead of a crash."""
    with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
        adapter.kimia.detokenize_audio(torch.zeros(1, 0))  # what kimia_infer itself does with zero tokens
    weight = adapter.kimia.alm.mimo_output.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.zero_()  # all audio logits equal: argmax is id 0, <|im_msg_end|>, so speech ends at once
    try:
        with pytest.warns(NoAudioWarning, match="no audio tokens"):
            result = adapter.generate(tiny_requests(1), tiny_config())[0]
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert result.waveform.size == 0 and result.waveform.dtype == np.float32
    assert result.info["audio_tokens"] == 0 and result.info["audio_stopped_by"] == "end token"
    assert "detokenize_audio" not in vars(adapter.kimia)  # the wrapper's own method is back


def test_device_cpu_is_refused_for_the_published_code(tiny_dir, tmp_path):
    """Point 6: kimia_infer runs on CUDA only; device='cpu' used to be ignored silently."""
    with pytest.raises(EsnError, match=r"CUDA only .*got device='cpu'"):
        KimiAudioAdapter.load(published(tiny_dir, tmp_path), device="cpu", trust_remote_code=True)


def test_cuda_devices_are_resolved_to_an_index(tiny_dir, monkeypatch):
    """Point 6: torch.cuda.set_device(torch.device("cuda")) raises; "cuda" means the current device."""
    cuda = FakeCuda(monkeypatch)
    KimiAudioAdapter.load(tiny_dir, device="cuda", dtype="float32", trust_remote_code=True)
    KimiAudioAdapter.load(tiny_dir, device="cuda:0", dtype="float32", trust_remote_code=True)
    assert cuda.selected == [1, 0]
    with pytest.raises(EsnError, match=r"has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        KimiAudioAdapter.load(tiny_dir, device="cuda:2", trust_remote_code=True)
    with pytest.raises(EsnError, match=r"device 'mps' is not 'cuda' or 'cuda:N'"):
        KimiAudioAdapter.load(tiny_dir, device="mps", trust_remote_code=True)


def test_published_code_needs_transformers_4(tiny_dir, tmp_path, monkeypatch):
    """Point 7: the ALM calls apply_rotary_pos_emb with position_ids as a 5th positional argument, which
    transformers 5 no longer takes; the range is checked before anything loads, with the install line."""
    import transformers

    FakeCuda(monkeypatch)
    with pytest.raises(EsnError, match=r"transformers>=4\.37,<5 \(you have " + transformers.__version__) as info:
        KimiAudioAdapter.load(published(tiny_dir, tmp_path), device="cuda", trust_remote_code=True)
    message = str(info.value)
    assert "apply_rotary_pos_emb" in message and "kimi-audio (not installed" in message
    assert message.endswith("pip install torch==2.4.1 torchaudio==2.4.1 transformers==4.51.3 && "
                            "pip install --no-build-isolation flash-attn && "
                            "pip install git+https://github.com/MoonshotAI/Kimi-Audio.git")


@pytest.mark.slow
def test_max_audio_tokens_beyond_the_120_s_budget_is_reported(adapter):
    """Point 9: "both" mode allows 1500 steps minus the prompt; a cap above what is left never fires and
    the audio silently ends at the budget. The adapter warns, and says what stopped the audio."""
    config = tiny_config(max_new_tokens=4, max_audio_tokens=1024)
    # audio long enough that the prompt (12.5 positions a second, one per instruction character) is ~1450
    seconds = (1450 - len(adapter.instruction(tiny_requests(1)[0], config))) / 12.5
    long_input = [EVCRequest(speech_like(seconds), "happy", id="long")]
    with pytest.warns(BudgetWarning, match=r"max_audio_tokens=1024 is more than kimia_infer's 120 s budget"):
        result = adapter.generate(long_input, config)[0]
    info = result.info
    assert info["step_budget"] == 1500 - info["prompt_positions"] and 0 < info["step_budget"] < 1024
    assert info["audio_stopped_by"] == "120 s budget" and "audio_capped_at_step" not in info
    assert info["audio_tokens"] == info["step_budget"] - 6
    assert result.waveform.size == info["audio_tokens"] * SAMPLES_PER_TOKEN
    too_long = [EVCRequest(speech_like(121.0), "happy", id="too-long")]
    with pytest.warns(NoAudioWarning, match="fills kimia_infer's whole 1500-step"):
        assert adapter.generate(too_long, tiny_config())[0].waveform.size == 0


def test_the_model_extra_pins_what_the_adapter_checks():
    """pyproject's "model" extra installs the PyPI part of the requirements that load() and
    `esn adapters check` enforce, with the same pins."""
    import tomllib
    from pathlib import Path

    from esn_kimi_audio.adapter import REQUIREMENTS

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    pypi = [r.pip_argument for r in REQUIREMENTS if not r.pip_options and "+" not in r.pip_argument]
    assert pyproject["project"]["optional-dependencies"]["model"] == pypi
