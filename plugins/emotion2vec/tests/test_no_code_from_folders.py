"""A judge folder never makes esn run or install code without the trust_remote_code option (issue #13.1).

Each load runs in a fresh process whose PATH starts with a folder holding a ``pip`` that only leaves a
marker file: funasr's ``pip install -r requirements.txt`` for a folder whose config.yaml asks for remote
code shows up as that marker. A ``model.pt`` that would run ``exec`` when unpickled shows up the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from esn_emotion2vec.judge import Emotion2vecJudge


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return Emotion2vecJudge.write_tiny(tmp_path_factory.mktemp("e2v"), seed=0)


def copy_of(tiny_dir: Path, dest: Path, **config) -> Path:
    shutil.copytree(tiny_dir, dest)
    cfg = yaml.safe_load((dest / "config.yaml").read_text()) | config
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False))
    return dest


def load_in_process(folder: Path, tmp_path: Path, env_extra: dict | None = None, **options) -> dict:
    """Load ``folder`` in a fresh process with a marker-writing ``pip`` first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    pip = bin_dir / "pip"
    pip.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'pip-ran'}\n")
    pip.chmod(0o755)
    script = textwrap.dedent(f"""
        import json
        from esn.errors import EsnError
        from esn_emotion2vec import Emotion2vecJudge
        try:
            Emotion2vecJudge.load({str(folder)!r}, **{options!r})
            print(json.dumps({{"loaded": True}}))
        except EsnError as exc:
            print(json.dumps({{"loaded": False, "error": str(exc)}}))
    """)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **(env_extra or {})}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_folder_asking_for_remote_code_is_refused_and_pip_never_runs(tiny_dir, tmp_path):
    folder = copy_of(tiny_dir, tmp_path / "asks", trust_remote_code=True, remote_code="./model.py")
    (folder / "requirements.txt").write_text("some-package==1.0\n")
    result = load_in_process(folder, tmp_path)
    assert not result["loaded"]
    assert "trust_remote_code: True in config.yaml" in result["error"]
    assert "requirements.txt" in result["error"] and "trust_remote_code = true" in result["error"]  # the opt-in
    assert not (tmp_path / "pip-ran").exists()


def test_opting_in_lets_funasr_do_what_the_folder_asks(tiny_dir, tmp_path):
    folder = copy_of(tiny_dir, tmp_path / "trusted", trust_remote_code=True)
    (folder / "requirements.txt").write_text("some-package==1.0\n")
    result = load_in_process(folder, tmp_path, trust_remote_code=True)
    assert result == {"loaded": True}
    assert "install -r" in (tmp_path / "pip-ran").read_text()  # funasr's own feature, asked for explicitly


def test_a_folder_asking_for_further_models_is_refused(tiny_dir, tmp_path):
    folder = copy_of(tiny_dir, tmp_path / "vad", vad_model="fsmn-vad")
    result = load_in_process(folder, tmp_path)
    assert not result["loaded"] and "further models (vad_model)" in result["error"]


def test_an_evaluated_config_string_never_runs(tiny_dir, tmp_path):
    """funasr eval()s config.yaml's feature_encoder_spec: only a literal of numbers may get there."""
    from esn_emotion2vec.judge import is_literal_spec
    from esn_emotion2vec.tiny import tiny_config

    assert is_literal_spec(tiny_config()["model_conf"]["modalities"]["audio"]["feature_encoder_spec"])
    assert is_literal_spec("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] + [(512, 2, 2)]")
    marker = tmp_path / "evaluated"
    cfg = yaml.safe_load((tiny_dir / "config.yaml").read_text())
    cfg["model_conf"]["modalities"]["audio"]["feature_encoder_spec"] = (
        f"[(8, 10, 5)] * (open({str(marker)!r}, 'w').write('ran') or 1)")
    folder = tmp_path / "evil_spec"
    shutil.copytree(tiny_dir, folder)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False))
    result = load_in_process(folder, tmp_path)
    assert not result["loaded"] and "feature_encoder_spec" in result["error"] and "eval()" in result["error"]
    assert not marker.exists()


def test_a_pickled_checkpoint_never_runs_whatever_torch_defaults_to(tiny_dir, tmp_path):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 gives torch < 2.6's default (full unpickling) for calls that do
    not pass weights_only, such as funasr's: esn must still load model.pt in weights-only mode."""
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    folder = copy_of(tiny_dir, tmp_path / "pickled")
    state = torch.load(tiny_dir / "model.pt", weights_only=True)
    torch.save({**state, "extra": Payload()}, folder / "model.pt")
    result = load_in_process(folder, tmp_path, {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert not result["loaded"]
    assert "weights-only mode" in result["error"] and "exec" in result["error"]
    assert not marker.exists()


def test_options_are_checked_before_anything_loads(tiny_dir):
    from esn.errors import EsnError

    for options, words in (({"trust_remote_code": "yes"}, "must be of type bool"), ({"mapping": "top3"}, "mapping"),
                           ({"hub": "s3"}, "hub"), ({"threads": 0}, "threads"), ({"colour": 1}, "unknown option")):
        with pytest.raises(EsnError, match=words):
            Emotion2vecJudge.check_options(options)
        with pytest.raises(EsnError, match=words):
            Emotion2vecJudge.load(str(tiny_dir), **options)
    Emotion2vecJudge.check_options({"mapping": "five", "threads": 2, "trust_remote_code": False})
