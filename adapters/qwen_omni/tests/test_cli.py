"""``esn hookpoints``, ``esn convert`` and ``esn adapters tiny`` on the tiny checkpoint, in process."""

import json

import numpy as np
import pytest
import soundfile as sf
from esn.artifacts import save_masks
from esn.cli import main
from esn.hookpoints import HookPoint, Layout

FAST = ["--max-new-tokens", "4", "--max-audio-tokens", "6"]


def _convert(tiny_dir, wav, out, *extra):
    return main(["convert", str(wav), "--adapter", "qwen_omni", "--model", str(tiny_dir), "--emotion", "happy",
                 "-o", str(out), *FAST, *extra])


def test_adapters_tiny_writes_a_loadable_checkpoint(tmp_path, capsys):
    assert main(["adapters", "tiny", "qwen_omni", str(tmp_path / "t")]) == 0
    assert main(["hookpoints", "--adapter", "qwen_omni", "--model", str(tmp_path / "t"), "--json"]) == 0
    text = capsys.readouterr().out
    out = json.loads(text[text.index("{"):])  # after the "wrote ..." line
    assert [h["name"] for h in out["hook_points"]] == [
        "lm.layers.0.mlp.gate", "lm.layers.1.mlp.gate", "synth.layers.0.mlp.gate", "synth.layers.1.mlp.gate"]
    assert [h["width"] for h in out["hook_points"]] == [64, 64, 48, 48] and out["n_neurons"] == 224


def test_hookpoints_table(tiny_dir, capsys):
    assert main(["hookpoints", "--adapter", "qwen_omni", "--model", str(tiny_dir)]) == 0
    text = capsys.readouterr().out
    assert "synth.layers.1.mlp.gate" in text and "224 neurons" in text


@pytest.mark.parametrize(("rate", "channels"), [(16_000, 1), (8_000, 1), (48_000, 1), (44_100, 2)])
def test_convert_any_rate_and_channels(tiny_dir, tmp_path, capsys, rate, channels, speech_fn):
    wave = speech_fn(1.0, 0, rate)
    sf.write(tmp_path / "in.wav", np.stack([wave] * channels, 1) if channels > 1 else wave, rate)
    assert _convert(tiny_dir, tmp_path / "in.wav", tmp_path / "out.wav") == 0
    out, sr = sf.read(tmp_path / "out.wav")
    assert sr == 24_000 and out.ndim == 1 and out.size > 0
    assert capsys.readouterr().out.strip()  # the decoded text is printed


def _bad(tiny_dir, tmp_path, capsys, wav, *extra, code: int = 1) -> str:
    """The error of a refused conversion: exit 1 for an input that does not fit, 2 for a wrong command line."""
    assert _convert(tiny_dir, wav, tmp_path / "bad.wav", *extra) == code
    assert not (tmp_path / "bad.wav").exists()
    return capsys.readouterr().err


def test_convert_refuses_bad_audio(tiny_dir, tmp_path, capsys, speech_fn):
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really a wave file")
    assert "cannot read audio file" in _bad(tiny_dir, tmp_path, capsys, tmp_path / "junk.wav")
    assert "not found" in _bad(tiny_dir, tmp_path, capsys, tmp_path / "missing.wav")
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16_000)
    assert "empty" in _bad(tiny_dir, tmp_path, capsys, tmp_path / "empty.wav")
    sf.write(tmp_path / "silent.wav", np.zeros(16_000, np.float32), 16_000)
    assert "silent" in _bad(tiny_dir, tmp_path, capsys, tmp_path / "silent.wav")
    sf.write(tmp_path / "long.wav", speech_fn(61, 0, 8_000), 8_000)  # beyond esn's 60 s for any file
    assert "at most 60 s" in _bad(tiny_dir, tmp_path, capsys, tmp_path / "long.wav")
    sf.write(tmp_path / "45s.wav", speech_fn(45, 0, 8_000), 8_000)  # beyond Qwen's 30 s audio window
    assert "at most 30 s" in _bad(tiny_dir, tmp_path, capsys, tmp_path / "45s.wav")


def test_convert_refuses_bad_arguments(tiny_dir, tmp_path, capsys, speech_fn):
    sf.write(tmp_path / "in.wav", speech_fn(1.0, 0), 16_000)
    assert "unknown emotion 'joyful'" in _bad(tiny_dir, tmp_path, capsys, tmp_path / "in.wav", "--emotion", "joyful",
                                              code=2)
    assert "need --mask" in _bad(tiny_dir, tmp_path, capsys, tmp_path / "in.wav", "--alpha", "0.5", code=2)
    # the voices are the checkpoint's: a name it lacks is found once the model is loaded (exit 1)
    assert "unknown speaker" in _bad(tiny_dir, tmp_path, capsys, tmp_path / "in.wav", "--speaker", "Nobody")


def test_convert_with_masks(tiny_dir, tmp_path, capsys, speech_fn, adapter):
    sf.write(tmp_path / "in.wav", speech_fn(1.0, 0), 16_000)
    layout = adapter.layout()
    save_masks(tmp_path / "m.safetensors", {"happy": np.arange(0, 224, 7), "sad": np.arange(5)}, layout=layout)
    assert _convert(tiny_dir, tmp_path / "in.wav", tmp_path / "out.wav", "--mask", str(tmp_path / "m.safetensors"),
                    "--method", "steer", "--alpha", "0.5") == 0
    assert _convert(tiny_dir, tmp_path / "in.wav", tmp_path / "out2.wav", "--mask", str(tmp_path / "m.safetensors"),
                    "--mask-emotion", "sad", "--method", "deactivate") == 0
    capsys.readouterr()
    assert "no mask for emotion 'angry'" in _bad(tiny_dir, tmp_path, capsys, tmp_path / "in.wav", "--mask",
                                                str(tmp_path / "m.safetensors"), "--mask-emotion", "angry")
    other = Layout([HookPoint("lm", i, 4096, module="") for i in range(28)])
    save_masks(tmp_path / "other.safetensors", {"happy": np.arange(10)}, layout=other)
    err = _bad(tiny_dir, tmp_path, capsys, tmp_path / "in.wav", "--mask", str(tmp_path / "other.safetensors"))
    assert "another hook-point layout" in err
    assert "steer alpha must be >= -1" in _bad(tiny_dir, tmp_path, capsys, tmp_path / "in.wav", "--mask",
                                               str(tmp_path / "m.safetensors"), "--alpha", "-2", code=2)


def test_convert_json_and_decoded_text_on_a_terminal(tiny_dir, tmp_path, capsys, speech_fn, monkeypatch):
    """`--json` prints one JSON document (ASCII: escapes, not control codes); without it the decoded text is
    printed with control characters shown as escapes. The model's text is made hostile on the way out of the
    real generate (a random model can decode any token, ESC included)."""
    import dataclasses

    from esn_qwen_omni import QwenOmniAdapter

    sf.write(tmp_path / "in.wav", speech_fn(1.0, 0), 16_000)
    assert _convert(tiny_dir, tmp_path / "in.wav", tmp_path / "out.wav", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["output"] == str(tmp_path / "out.wav") and out["emotion"] == "happy" and out["sample_rate"] == 24_000
    assert out["seconds"] > 0 and isinstance(out["text"], str) and out["mask"] is None

    real = QwenOmniAdapter.generate

    def hostile(self, requests, config):
        return [dataclasses.replace(r, text="hi\x1b[2J\x1b]0;title\x07\u202e") for r in real(self, requests, config)]

    monkeypatch.setattr(QwenOmniAdapter, "generate", hostile)
    assert _convert(tiny_dir, tmp_path / "in.wav", tmp_path / "out2.wav") == 0
    printed = capsys.readouterr().out
    assert printed.strip() == "hi\\x1b[2J\\x1b]0;title\\x07\\u202e" and "\x1b" not in printed
    assert _convert(tiny_dir, tmp_path / "in.wav", tmp_path / "out3.wav", "--json") == 0
    raw = capsys.readouterr().out
    assert raw.isascii() and json.loads(raw)["text"] == "hi\x1b[2J\x1b]0;title\x07\u202e"
