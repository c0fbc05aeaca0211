"""Reading a checkpoint's files before any weight: local folders, hub ids, and one-line errors."""

import json

import pytest
from esn.errors import EsnError
from esn.hub import checkpoint_file, read_checkpoint_config


def test_config_of_a_local_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["X"]}))
    assert read_checkpoint_config(tmp_path, "org/model") == {"architectures": ["X"]}
    assert checkpoint_file(tmp_path, "config.json") == tmp_path / "config.json"
    assert checkpoint_file(tmp_path, "spk_dict.pt") is None


@pytest.mark.parametrize("make, match", [
    (lambda p: p / "missing", r"'.*missing' not found: give a checkpoint directory or a hub id like org/model"),
    (lambda p: (p / "w.bin").write_bytes(b"x") and p / "w.bin", r"w.bin' is a file; give the checkpoint directory"),
    (lambda p: p, r"no config.json \(not a transformers checkpoint"),
    (lambda p: (p / "config.json").write_text("{oops") and p, r"config.json: unreadable config.json"),
    (lambda p: (p / "config.json").write_text("[1, 2]") and p, r"config.json is not a JSON object"),
])
def test_bad_checkpoints_are_one_line_errors(tmp_path, make, match):
    with pytest.raises(EsnError, match=match) as info:
        read_checkpoint_config(make(tmp_path), "org/model")
    assert "\n" not in str(info.value)


def test_an_unreachable_hub_id_is_an_error_not_a_hang(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to find offline
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EsnError, match=r"no-such-org/no-such-model: no config.json"):
        read_checkpoint_config("no-such-org/no-such-model", "org/model")
    assert checkpoint_file("no-such-org/no-such-model", "config.json") is None
