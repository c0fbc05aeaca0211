"""The ``esn`` command as a new user meets it: light commands stay light, every argument is checked before a
model loads, and mistakes get one line that says what to do."""

import json
import os
import re
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


def _err(capsys, argv, code: int = 2) -> str:
    """The one error line of ``esn argv``, which must exit ``code``: 2 for a usage error (the command line
    is wrong), 1 for a runtime failure (a file, a model, a folder that does not fit)."""
    assert main(argv) == code
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

    def convert(*extra, out=tmp_path / "out.wav", code=2):
        return _err(capsys, ["convert", str(wav), "--adapter", "qwen_omni", "--model", str(tmp_path),
                             "--emotion", "happy", "-o", str(out), *extra], code)

    assert "unknown intervention 'boost'" in convert(*mask, "--method", "boost")
    assert "steer alpha must be >= -1" in convert(*mask, "--alpha", "-2")
    assert "intervention 'deactivate' takes no alpha" in convert(*mask, "--method", "deactivate", "--alpha", "0.5")
    assert "no mask for emotion 'sad'" in convert(*mask, "--mask-emotion", "sad", code=1)  # the file's content
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
    assert "some.wav is a file; give a folder" in _err(capsys, ["adapters", "tiny", "qwen_omni",
                                                               str(tmp_path / "some.wav")], 1)
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    assert "is not empty (1 entries)" in _err(capsys, ["adapters", "tiny", "qwen_omni", str(full)], 1)
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
    err = _err(capsys, ["hookpoints", "--adapter", "qwen_omni", "--model", "Qwen/Not-There-7B"], 1)  # runtime
    assert "'Qwen/Not-There-7B' is not a local folder and not in the hub cache" in err
    assert "`hf download Qwen/Not-There-7B`" in err  # huggingface_hub's current command
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


def test_hookpoints_show_kind_down_proj_and_meta_in_the_table_and_json(tmp_path, capsys, monkeypatch):
    import dataclasses

    QwenOmniAdapter.write_tiny(tmp_path / "t")
    points = QwenOmniAdapter.hook_points
    monkeypatch.setattr(QwenOmniAdapter, "hook_points", lambda self: [
        dataclasses.replace(hp, meta={"activation": "silu"}) if hp.layer == 0 else hp for hp in points(self)])
    monkeypatch.setattr(ui.console, "width", 300)
    assert main(["hookpoints", "--adapter", "qwen_omni", "--model", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "down_proj" in out and "kind" in out and "activation=silu" in out
    assert "talker.model.layers.1.mlp.down_proj" in out and " dense " in out
    assert main(["hookpoints", "--adapter", "qwen_omni", "--model", str(tmp_path / "t"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["hook_points"]
    first = rows[0]
    assert first["kind"] == "dense" and first["meta"] == {"activation": "silu"}
    assert first["down_proj"] == "thinker.model.language_model.layers.0.mlp.down_proj"
    assert rows[-1]["meta"] == {} and rows[-1]["down_proj"] == "talker.model.layers.1.mlp.down_proj"


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


# -- hints name what exists; exit codes; --json; decoded text on a terminal (issue 29) -----------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
def test_a_cpu_machine_is_told_the_config_key_not_a_flag_esn_run_lacks(tmp_path, capsys):
    cfg = tmp_path / "study.toml"
    assert main(["init", str(cfg), "--source", str(tmp_path)]) == 0
    text = cfg.read_text()
    assert 'device = "' in text
    cfg.write_text(text.replace('device = "cpu"', 'device = "cuda"').replace('device = "auto"', 'device = "cuda"'))
    capsys.readouterr()
    assert main(["run", str(cfg)]) == 1  # the config does not fit this machine: a runtime failure
    err = capsys.readouterr().err
    assert 'model.device: ' in err and 'set model.device = "cpu"' in err and "--device" not in err, err
    from esn.cli import build_parser

    run_flags = {o for a in build_parser()._subparsers._group_actions[0].choices["run"]._actions for o in a.option_strings}
    assert "--device" not in run_flags  # why the flag must not be named
    assert "use --device cpu" in _err(capsys, ["hookpoints", "--adapter", "qwen_omni", "--model", str(tmp_path),
                                               "--device", "cuda"])  # where the flag exists, it is named


def test_a_first_party_adapter_that_is_not_installed_gets_its_install_line():
    env = {**os.environ, "ESN_LOAD_PLUGINS": "qwen_omni"}
    done = subprocess.run([sys.executable, "-m", "esn", "adapters", "check", "qwen3_omni"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr  # a name on the command line that nothing installed has
    assert "'qwen3_omni' is a first-party adapter of the distribution esn-qwen3-omni" in done.stderr
    assert "pip install --find-links dist esn-qwen3-omni" in done.stderr and "did you mean" not in done.stderr


def test_every_first_party_plugin_is_named_with_its_distribution():
    """A plugin of this repository that is not installed is always named with its distribution, never guessed
    from the typed name: FIRST_PARTY lists every adapter and judge the repository's distributions register."""
    from esn.plugins import FIRST_PARTY, registry

    reg = registry()
    ours = {info.distribution for info in reg.plugins if info.distribution.startswith("esn-")} - {"esn-core"}
    for kind, table in (("adapter", reg.adapters), ("judge", reg.judges)):
        for name in table:
            dist = reg.origin[(kind + "s", name)].distribution
            if dist in ours:
                assert FIRST_PARTY.get((kind, name), (None,))[0] == dist, (kind, name, dist)


def _flags_and_commands():
    import argparse

    from esn.cli import build_parser

    flags, commands = set(), set()

    def walk(parser, prefix):
        for action in parser._actions:
            flags.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    commands.add((*prefix, name))
                    walk(child, (*prefix, name))

    walk(build_parser(), ())
    return flags, commands


# Flags of other programs that esn's messages and docstrings name (pip, torchrun, hf).
FOREIGN_FLAGS = {"--find-links", "--index-url", "--no-build-isolation", "--local-dir", "--nnodes", "--nproc-per-node",
                 "--standalone", "--no-python"}


def test_every_flag_and_command_a_message_names_exists():
    """Each `--flag` in a string of the code is an esn flag (or one of the named foreign programs'), and each
    `esn COMMAND [ACTION]` it quotes is a command: a hint never sends a user to something that is not there."""
    import ast
    from pathlib import Path

    import esn

    flags, commands = _flags_and_commands()
    roots = [Path(esn.__file__).parent, *Path(__file__).resolve().parents[1].glob("adapters/*/src"),
             *Path(__file__).resolve().parents[1].glob("plugins/*/src")]
    wrong = []
    for path in (p for root in roots for p in root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                continue
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", node.value):
                if flag not in flags | FOREIGN_FLAGS:
                    wrong.append(f"{path}:{node.lineno}: {flag}")
            for one, two in re.findall(r"`esn ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?", node.value):
                has_actions = any(len(c) == 2 and c[0] == one for c in commands)
                if (one,) not in commands or (two and has_actions and (one, two) not in commands):
                    wrong.append(f"{path}:{node.lineno}: esn {one} {two}")
    assert not wrong, "\n".join(wrong)


def test_every_config_key_a_message_names_exists():
    """`model.device`, `evaluate.save_audio`...: each `section.key` in a string of the core is a field of
    that section of the run configuration."""
    import ast
    from pathlib import Path

    import esn
    from esn.pipeline.config import RunConfig

    sections = {name: getattr(f.annotation, "model_fields", {}) for name, f in RunConfig.model_fields.items()}
    pattern = r"(?<![\w.])(" + "|".join(s for s in sections if sections[s]) + r")\.([a-z_]+)\b(?!\()"
    named, wrong = 0, []
    for path in Path(esn.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for section, key in re.findall(pattern, node.value):
                    named += 1
                    if key not in sections[section]:
                        wrong.append(f"{path}:{node.lineno}: {section}.{key}")
    assert named > 20 and not wrong, "\n".join(wrong)


def test_exit_codes_separate_usage_from_runtime(tmp_path, capsys):
    """2: the command line is wrong; 1: what it names does not fit (docs/cli.md)."""
    assert main([]) == 2  # no command: the help, as a usage error
    assert "--shard and --workers exclude each other" in _err(capsys, ["run", str(tmp_path / "none.toml"),
                                                                       "--shard", "0/2", "--workers", "2"])
    assert "config file not found" in _err(capsys, ["run", str(tmp_path / "none.toml")], 1)
    assert "unknown stage" in _err(capsys, ["run", str(tmp_path / "none.toml"), "--stages", "recrd"])
    with pytest.raises(SystemExit) as info:
        main(["run"])
    assert info.value.code == 2


def test_decoded_text_never_reaches_the_terminal_as_control_codes():
    from esn.display import header_text, printable

    evil = "ok\x1b[2J\x1b]0;pwned\x07 \u202eevil\u202c \x9b31m\x00 é 中\nnext\tline"
    shown = printable(evil)
    assert not any(c in shown for c in "\x1b\x07\u202e\u202c\x9b\x00")
    assert shown == "ok\\x1b[2J\\x1b]0;pwned\\x07 \\u202eevil\\u202c \\x9b31m\\x00 é 中\nnext\tline"
    value, cut = header_text("é" * 1000)
    assert cut and len(value) <= 512 and value.endswith("%C3%A9")  # whole characters, bounded
    assert header_text("short text") == ("short%20text", False)
