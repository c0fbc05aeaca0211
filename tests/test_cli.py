"""The ``esn`` command as a new user meets it: light commands stay light, every argument is checked before a
model loads, and mistakes get one line that says what to do."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf
import torch
from esn.artifacts import save_masks
from esn.cli import main, ui
from esn.errors import EsnError
from esn.hookpoints import HookPoint, Layout
from esn_qwen_omni import QwenOmniAdapter

LIGHT_COMMANDS = [["--version"], ["--help"], ["adapters", "list"], ["plugins", "list"], ["adapters", "--help"],
                  ["convert", "--help"], ["serve", "--help"], ["human", "serve", "--help"]]

# Runs the CLI in a fresh interpreter and reports who imported torch or transformers first, if anyone did.
SPY = textwrap.dedent("""
    import json, sys, traceback, importlib.abc
    found = {}
    class Spy(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name in ("torch", "transformers", "fastapi", "uvicorn") and name not in found:
                frames = [f for f in traceback.extract_stack()[:-1] if "importlib" not in f.filename]
                found[name] = [f"{f.filename}:{f.lineno}" for f in frames[-6:]]
            return None
    sys.meta_path.insert(0, Spy())
    from esn.cli import main
    try:
        main(sys.argv[1:])
    except SystemExit:
        pass
    sys.stdout.flush()
    print("\\nSPY" + json.dumps(found))
""")


@pytest.mark.parametrize("argv", LIGHT_COMMANDS, ids=" ".join)
def test_light_commands_import_neither_torch_nor_transformers(argv):
    """``esn --version``, ``--help``, ``adapters list`` and ``plugins list`` with every plugin of the repository
    installed: nothing imports torch (3 s) or transformers, nor the web stack of ``esn serve`` (fastapi,
    uvicorn). Timings: benchmarks/bench_cli.py."""
    env = {k: v for k, v in os.environ.items() if k != "ESN_LOAD_PLUGINS"}  # every installed plugin
    done = subprocess.run([sys.executable, "-c", SPY, *argv], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.rsplit("SPY", 1)[1])
    assert not found, "imported on a light command (last frames of the importing stack):\n" + json.dumps(found, indent=1)


@pytest.fixture
def no_load(monkeypatch):
    """Make any model load fail the test: the checks under test must refuse before it."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(QwenOmniAdapter, "load", classmethod(load))


def _err(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err  # one line
    return err


@pytest.mark.parametrize(("device", "expected"), [
    ("gpu", "unknown device 'gpu': use cpu, cuda, cuda:1 or mps"),
    ("cuda", "CPU-only build and sees no CUDA device"),
    ("cuda:1", "CPU-only build and sees no CUDA device"),
    ("cpu:x", "unknown device 'cpu:x'"),
])
def test_a_device_this_torch_cannot_use_is_refused_before_loading(tmp_path, capsys, no_load, device, expected):
    if torch.cuda.is_available() and device.startswith("cuda"):
        pytest.skip("this torch has CUDA")
    err = _err(capsys, ["hookpoints", "--adapter", "qwen_omni", "--model", str(tmp_path), "--device", device])
    assert expected in err


def test_convert_checks_every_argument_before_loading(tmp_path, capsys, no_load):
    wav = tmp_path / "in.wav"
    sf.write(wav, (0.1 * np.sin(np.arange(16_000) / 8)).astype(np.float32), 16_000)
    layout = Layout([HookPoint("lm", 0, 8, module="m")])
    save_masks(tmp_path / "m.safetensors", {"happy": np.arange(3)}, layout=layout)
    mask = ["--mask", str(tmp_path / "m.safetensors")]

    def convert(*extra, out=tmp_path / "out.wav"):
        return _err(capsys, ["convert", str(wav), "--adapter", "qwen_omni", "--model", str(tmp_path),
                             "--emotion", "happy", "-o", str(out), *extra])

    assert "unknown intervention 'boost'" in convert(*mask, "--method", "boost")
    assert "steer alpha must be >= -1" in convert(*mask, "--alpha", "-2")
    assert "intervention 'deactivate' takes no alpha" in convert(*mask, "--method", "deactivate", "--alpha", "0.5")
    assert "no mask for emotion 'sad'" in convert(*mask, "--mask-emotion", "sad")
    assert "need --mask" in convert("--method", "add")
    assert "dtype 'half' is not one of" in convert("--dtype", "half")
    assert "must end in .wav" in convert(out=tmp_path / "out.mp3")
    (tmp_path / "folder.wav").mkdir()
    assert "is a folder" in convert(out=tmp_path / "folder.wav")
    assert "is the input file" in convert(out=wav)
    (tmp_path / "afile").write_text("")
    assert "is a file, not a folder" in convert(out=tmp_path / "afile" / "out.wav")
    assert "unknown adapter 'qwen'" in _err(capsys, ["convert", str(wav), "--adapter", "qwen", "--model",
                                                     str(tmp_path), "--emotion", "happy", "-o", "o.wav"])


def test_adapters_tiny_refuses_a_file_and_a_folder_that_is_not_empty(tmp_path, capsys):
    (tmp_path / "some.wav").write_bytes(b"RIFF")
    assert "some.wav is a file; give a folder" in _err(capsys, ["adapters", "tiny", "qwen_omni", str(tmp_path / "some.wav")])
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    assert "is not empty (1 entries)" in _err(capsys, ["adapters", "tiny", "qwen_omni", str(full)])
    assert [p.name for p in full.iterdir()] == ["notes.txt"]  # nothing written
    assert main(["adapters", "tiny", "qwen_omni", str(full), "--force", "--quiet"]) == 0
    assert (full / "config.json").is_file() and (full / "notes.txt").read_text() == "mine"


def test_an_unreachable_hub_fails_at_once_with_the_reason(monkeypatch, tmp_path, capsys, no_load):
    """No network: the hub probe fails in one connect, offline mode goes on, and the uncached model is named
    (huggingface_hub alone retries for half a minute first)."""
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    err = _err(capsys, ["hookpoints", "--adapter", "qwen_omni", "--model", "Qwen/Not-There-7B"])
    assert "'Qwen/Not-There-7B' is not a local folder and not in the hub cache" in err
    assert "http://127.0.0.1:9) cannot be reached" in err
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_a_cached_model_passes_offline_and_a_missing_path_is_named(monkeypatch, tmp_path):
    from esn.hub import prepare_source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    (tmp_path / "models--Qwen--Cached-7B" / "snapshots" / "abc123").mkdir(parents=True)
    prepare_source("Qwen/Cached-7B")  # in the cache: fine offline
    with pytest.raises(EsnError, match="HF_HUB_OFFLINE is set"):
        prepare_source("Qwen/Other-7B")
    with pytest.raises(EsnError, match="not found: no such file or folder, and not a hub id"):
        prepare_source(str(tmp_path / "no" / "such" / "dir"))
    prepare_source(str(tmp_path))  # an existing folder: nothing to check


def test_plugin_names_get_a_useful_hint(capsys, monkeypatch):
    err = _err(capsys, ["adapters", "tiny", "qwen_omnii", "/tmp/never-written"])
    assert "did you mean 'qwen_omni'" in err and "pip install esn-qwen_omnii" not in err
    err = _err(capsys, ["adapters", "tiny", "zzz", "/tmp/never-written"])
    assert "unknown adapter 'zzz' (known: kimi_audio, minicpm_o, moshi, planted, qwen3_omni, qwen_omni)" in err and "pip install" not in err


def test_a_missing_first_party_judge_names_its_distribution(tmp_path):
    """With no judge installed, ``--judge emotion2vec`` says which distribution brings it and how heavy it is."""
    sf.write(tmp_path / "a.wav", np.full(16_000, 0.1, np.float32), 16_000)
    env = {**os.environ, "ESN_LOAD_PLUGINS": "qwen_omni"}
    done = subprocess.run([sys.executable, "-m", "esn", "judge", str(tmp_path / "a.wav"), "--judge", "emotion2vec"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "unknown judge 'emotion2vec' (known: none installed)" in done.stderr
    assert "esn-emotion2vec" in done.stderr and "funasr, about 890 MB" in done.stderr


def test_quiet_and_verbose(tmp_path, capsys, monkeypatch):
    for var in ui.QUIET_ENV:  # --quiet sets them for the process: give them back after this test
        monkeypatch.delenv(var, raising=False)
    assert main(["--quiet", "adapters", "tiny", "qwen_omni", str(tmp_path / "a")]) == 0
    out = capsys.readouterr()
    assert out.err == "" and "wrote a tiny random qwen_omni checkpoint" in out.out  # the result still prints
    assert main(["adapters", "list", "-q", "--json"]) == 0  # after the command name too
    assert json.loads(capsys.readouterr().out)
    assert main(["-v", "hookpoints", "--adapter", "qwen_omni", "--model", str(tmp_path), "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "check_device" in err and err.rstrip().endswith("cuda, cuda:1 or mps")
    with pytest.raises(SystemExit):
        main(["--quiet", "--verbose", "adapters", "list"])
    ui.set_level(ui.NORMAL)


def test_hookpoints_table_keeps_module_paths_whole(tmp_path, capsys, monkeypatch):
    QwenOmniAdapter.write_tiny(tmp_path / "t")
    monkeypatch.setattr(ui.console, "width", 40)  # a narrow terminal
    assert main(["hookpoints", "--adapter", "qwen_omni", "--model", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    for path in ("thinker.model.language_model.layers.1.mlp.act_fn", "talker.model.layers.1.mlp.act_fn"):
        assert path in out, out
    assert "…" not in out


def test_version_is_the_installed_distributions():
    from importlib.metadata import version

    done = subprocess.run([sys.executable, "-m", "esn", "--version"], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == f"esn {version('esn-core')}"


def test_every_command_accepts_quiet_and_verbose():
    """Commands added by any module get the flags (they are added to every leaf parser generically)."""
    from esn.cli import _leaves, build_parser

    for leaf in _leaves(build_parser()):
        options = {s for a in leaf._actions for s in a.option_strings}
        assert {"-q", "--quiet", "-v", "--verbose"} <= options, leaf.prog
    assert len(_leaves(build_parser())) > 10
