"""emotion2vec+ judge on a tiny random model loaded through funasr's real AutoModel, offline."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf
import torch
from esn.audio import read_audio
from esn.emotions import EMOTIONS
from esn.errors import EsnError
from esn.judges import Audio
from esn_emotion2vec.judge import Emotion2vecJudge, class_name, pick_label
from esn_emotion2vec.tiny import TOKENS

RATES = (8_000, 16_000, 22_050, 44_100, 48_000)
CLASSES = ["angry", "disgusted", "fearful", "happy", "neutral", "other", "sad", "surprise", "unknown"]


def speechlike(rate: int, seconds: float, channels: int, seed: int) -> np.ndarray:
    """A voiced-looking test signal: a gliding harmonic tone with noise, ``[n]`` or ``[n, channels]``."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    f0 = 120 + 60 * t / seconds + 20 * seed
    wave = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / rate) / k for k in (1, 2, 3)) * 0.2
    wave = wave + 0.01 * rng.standard_normal(t.shape)
    if channels == 1:
        return wave.astype(np.float32)
    return np.stack([wave * (0.5 + 0.5 * c) for c in range(channels)], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return Emotion2vecJudge.write_tiny(tmp_path_factory.mktemp("e2v"), seed=0)


@pytest.fixture(scope="module")
def judge(tiny_dir):
    return Emotion2vecJudge.load(str(tiny_dir))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    paths = []
    for i, rate in enumerate(RATES):
        for channels in (1, 2):
            path = root / f"clip_{rate}_{channels}ch.wav"
            sf.write(str(path), speechlike(rate, 0.6 + 0.1 * i, channels, seed=i), rate, subtype="PCM_16")
            paths.append(path)
    return paths


def as_audio(path) -> Audio:
    data, rate = read_audio(path)
    return Audio(data, rate, name=str(path))


def test_tiny_model_scores_files_at_every_rate_mono_and_stereo(judge, files):
    audios = [as_audio(p) for p in files]
    assert {a.sample_rate for a in audios} == set(RATES) and {a.samples.shape[1] for a in audios} == {1, 2}
    results = judge.judge(audios)
    assert len(results) == len(files)
    for res in results:
        assert list(res.scores) == CLASSES
        assert sum(res.scores.values()) == pytest.approx(1.0, abs=1e-4)
        assert res.label == max(res.scores, key=res.scores.get)  # default: argmax over all 9
    # different inputs give different scores: the model really ran on each clip
    assert len({round(r.scores["neutral"], 6) for r in results}) == len(results)


def test_batched_equals_one_at_a_time_and_order_is_kept(judge, files):
    audios = [as_audio(p) for p in files[:4]]
    batched = judge.judge(audios)
    for audio, res in zip(audios, batched, strict=True):
        alone = judge.judge([audio])[0]
        assert alone.label == res.label
        np.testing.assert_allclose(list(alone.scores.values()), list(res.scores.values()), rtol=1e-5, atol=1e-7)
    assert judge.judge([]) == []


def test_five_way_mapping_never_leaves_the_five(tiny_dir, files):
    five = Emotion2vecJudge.load(str(tiny_dir), mapping="five")
    for res in five.judge([as_audio(p) for p in files]):
        assert res.label in EMOTIONS
        best5 = max(EMOTIONS, key=res.scores.get)
        assert res.label == best5


def test_label_mapping_rules_on_hand_written_scores():
    assert [class_name(t) for t in TOKENS] == CLASSES
    scores = dict.fromkeys(CLASSES, 0.01) | {"fearful": 0.6, "sad": 0.3, "happy": 0.05}
    assert pick_label(scores, "all9") == "fearful"  # outside the five: a miss for every target
    assert pick_label(scores, "all9") not in EMOTIONS
    assert pick_label(scores, "five") == "sad"
    assert pick_label(dict.fromkeys(CLASSES, 0.0) | {"surprise": 0.9}, "all9") == "surprise"


def test_funasr_leaves_logging_threads_and_stdout_alone(tiny_dir, files, tmp_path):
    # a fresh process: importing funasr calls logging.basicConfig, and load/generate set torch threads
    script = textwrap.dedent(f"""
        import json, logging, torch
        torch.set_num_threads(1)
        root = logging.getLogger()
        before = (list(root.handlers), root.level)
        from esn.audio import read_audio
        from esn.judges import Audio
        from esn_emotion2vec import Emotion2vecJudge
        Emotion2vecJudge.write_tiny({str(tmp_path / "m")!r})
        judge = Emotion2vecJudge.load({str(tiny_dir)!r}, threads=2)
        data, rate = read_audio({str(files[0])!r})
        res = judge.judge([Audio(data, rate)])
        after = (list(root.handlers), root.level)
        print(json.dumps({{"same": before == after, "threads": torch.get_num_threads(), "label": res[0].label}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)  # stdout holds our JSON only: funasr's prints went to stderr
    assert report == {"same": True, "threads": 1, "label": report["label"]} and report["label"] in CLASSES
    assert "[INFO]" not in out.stderr  # funasr's INFO logging did not reach the (unconfigured) root


def test_missing_and_wrong_checkpoints_fail_clearly(tmp_path, tiny_dir):
    with pytest.raises(EsnError, match="not found"):
        Emotion2vecJudge.load(str(tmp_path / "nope"))
    hf = tmp_path / "hf_model"  # a transformers checkpoint of another model
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    (hf / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(EsnError, match=r"not an emotion2vec .*missing config\.yaml, model\.pt, tokens\.txt"):
        Emotion2vecJudge.load(str(hf))

    def variant(name, **files):
        d = tmp_path / name
        d.mkdir()
        for f in ("config.yaml", "model.pt", "tokens.txt"):
            (d / f).write_bytes(files.get(f.replace(".", "_"), (tiny_dir / f).read_bytes()))
        return d

    other = tmp_path / "other.pt"
    torch.save({"model": {"encoder.weight": torch.zeros(3, 3)}}, other)
    with pytest.raises(EsnError, match="does not fit the Emotion2vec model"):
        Emotion2vecJudge.load(str(variant("foreign_weights", model_pt=other.read_bytes())))
    with pytest.raises(EsnError, match="funasr could not load"):
        Emotion2vecJudge.load(str(variant("corrupt_weights", model_pt=b"not a checkpoint")))
    with pytest.raises(EsnError, match="classifier classes"):
        Emotion2vecJudge.load(str(variant("odd_tokens", tokens_txt=b"a\nb\nc\nd\ne\nf\ng\nh\n<unk>\n")))
    with pytest.raises(EsnError, match="mapping"):
        Emotion2vecJudge.load(str(tiny_dir), mapping="top3")


def test_bad_audio_fails_clearly(judge, tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00garbage")
    with pytest.raises(EsnError, match="cannot read audio"):
        as_audio(corrupt)
    bad = np.full(16000, np.nan, dtype=np.float32)
    with pytest.raises(EsnError, match="NaN"):
        judge.judge([Audio(bad, 16000, name="nan.wav")])
    with pytest.raises(EsnError, match="silent"):
        judge.judge([Audio(np.zeros(16000, np.float32), 16000)])


def test_registered_as_a_judge_plugin_and_cheap_to_import():
    from esn.plugins import registry_with
    from esn_emotion2vec import plugin

    assert registry_with(plugin).judge("emotion2vec") is Emotion2vecJudge
    probe = "import sys, esn_emotion2vec.plugin; print('funasr' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.split()[0] == "False", out.stderr  # funasr (~6 s) is imported by load only


def test_cli_judge_prints_clean_json_and_one_line_errors(tiny_dir, files, tmp_path):
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "esn", "judge", "--judge", "emotion2vec", "--model", str(tiny_dir)]
    out = subprocess.run([*cmd, str(files[0]), str(files[3]), "--json", "--option", "mapping=five"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)  # nothing but JSON on stdout, whatever funasr prints
    assert [r["file"] for r in rows] == [str(files[0]), str(files[3])]
    assert all(r["label"] in EMOTIONS and list(r["scores"]) == CLASSES for r in rows)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF....WAVEnope")
    bad = subprocess.run([*cmd, str(corrupt)], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 1 and "cannot read audio file" in bad.stderr and "Traceback" not in bad.stderr
    wrong = subprocess.run([*cmd[:-1], str(tmp_path), str(files[0])], capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 1 and "not an emotion2vec" in wrong.stderr
