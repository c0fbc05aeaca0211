"""LALM judge: a tiny random Qwen3-Omni-MoE through the judge's own load, plus the answer parser."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from esn.audio import read_audio
from esn.emotions import EMOTIONS
from esn.errors import EsnError
from esn.judges import Audio
from esn_lalm_judge.answers import question
from esn_lalm_judge.judge import AUDIO_PAD, LalmJudge, chat_prompt, parse_answer
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return LalmJudge.write_tiny(tmp_path_factory.mktemp("qwen3omni"), seed=0)


@pytest.fixture(scope="module")
def judge(tiny_dir):
    return LalmJudge.load(str(tiny_dir), max_new_tokens=4, batch_size=2)


def clip(rate, seconds, channels, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.3 * np.sin(2 * np.pi * (180 + 30 * seed) * t) + 0.02 * rng.standard_normal(t.shape)
    return (wave if channels == 1 else np.stack([wave, wave * 0.7], 1)).astype(np.float32)


def test_tiny_judge_answers_for_files_at_many_rates_with_and_without_sources(judge, tmp_path):
    audios = []
    for i, (rate, ch) in enumerate([(8_000, 1), (16_000, 2), (22_050, 1), (44_100, 2), (48_000, 1)]):
        path = tmp_path / f"{i}.wav"
        sf.write(str(path), clip(rate, 0.3 + 0.2 * i, ch, i), rate, subtype="PCM_16")
        data, sr = read_audio(path)
        audios.append(Audio(data, sr, name=path.name))
    sources = [Audio(clip(24_000, 0.5, 1, 9), 24_000) for _ in audios]
    before = judge.unparseable
    for results in (judge.judge(audios), judge.judge(audios, sources=sources)):
        assert len(results) == len(audios)
        for res in results:
            assert res.label == parse_answer(res.raw) and (res.label is None or res.label in EMOTIONS)
    nones = sum(r.label is None for r in judge.judge(audios[:2]))
    assert judge.unparseable - before >= nones  # random weights: garbage answers are counted, never guessed
    # greedy: the same question gets the same answer, alone or in a (left-padded) batch
    assert [r.raw for r in judge.judge(audios[:3])] == [judge.judge([a])[0].raw for a in audios[:3]]


def test_prompt_has_the_question_and_one_placeholder_per_audio_token(judge):
    text = chat_prompt([7, 3], with_source=True)
    assert text.count(AUDIO_PAD) == 10 and text.count("<|audio_start|>") == 2
    assert text.endswith("<|im_start|>assistant\n")
    for letter, emotion in zip("ABCDE", EMOTIONS, strict=True):
        assert f"({letter}) {emotion}" in question(True) and f"({letter}) {emotion}" in question(False)
    assert "second audio" in question(True) and "second" not in question(False)
    ids = judge.tokenizer(text)["input_ids"]
    assert ids.count(judge.model.config.thinker_config.audio_token_id) == 10


@pytest.mark.parametrize(("answer", "label"), [
    ("B", "happy"), ("b", "happy"), ("(C)", "angry"), ("D.", "sad"), ("E)", "surprise"),
    ("(B) happy", "happy"), ("B. Happy", "happy"), ("Answer: D", "sad"), ("The answer is (A).", "neutral"),
    ("option c", "angry"), ("Sad", "sad"), ("SURPRISED!", "surprise"), ("happiness", "happy"),
    ("The speaker sounds angry.", "angry"), ("I think it's neutral, (A)", "neutral"),
    ("<think>maybe sad</think> (B)", "happy"), ("  e  ", "surprise"), ("A happy voice.", "happy"),
    ("(B) sad", None), ("happy or sad", None), ("", None), ("I cannot tell.", None),
    ("F", None), ("The speaker is fearful.", None), ("(A) (B)", None), ("a", "neutral"),
])
def test_parser_reads_hand_written_answers(answer, label):
    assert parse_answer(answer) == label


def test_bad_checkpoints_fail_clearly(tmp_path, tiny_dir):
    with pytest.raises(EsnError, match="not found"):
        LalmJudge.load(str(tmp_path / "missing"))
    with pytest.raises(EsnError, match=r"no config\.json"):
        LalmJudge.load(str(tmp_path))
    other = tmp_path / "qwen2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 10}))
    with pytest.raises(EsnError, match="holds a 'qwen2' model"):
        LalmJudge.load(str(other))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(EsnError, match="not valid JSON"):
        LalmJudge.load(str(broken))
    foreign = tmp_path / "foreign_weights"  # the right config and tokenizer, another model's weights
    shutil.copytree(tiny_dir, foreign)
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(foreign / "model.safetensors"))
    with pytest.raises(EsnError, match="thinker weights are missing"):
        LalmJudge.load(str(foreign))
    with pytest.raises(EsnError, match="dtype"):
        LalmJudge.load(str(tiny_dir), dtype="float7")


def test_bad_audio_and_mismatched_sources_fail_clearly(judge, tmp_path):
    a = Audio(clip(16_000, 0.3, 1, 0), 16_000)
    with pytest.raises(EsnError, match="1 audios but 2 sources"):
        judge.judge([a], sources=[a, a])
    with pytest.raises(EsnError, match="NaN"):
        judge.judge([Audio(np.full(1600, np.nan, np.float32), 16_000)])
    bad = tmp_path / "x.wav"
    bad.write_bytes(b"RIFFxxxxWAVEjunk")
    with pytest.raises(EsnError, match="cannot read audio"):
        read_audio(bad)


def test_plugin_import_is_cheap():
    probe = "import sys, esn_lalm_judge.plugin; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
