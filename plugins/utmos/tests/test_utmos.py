"""UTMOS judge: utmos-pytorch's real UTMOSScoreTorch on a random checkpoint of the real architecture."""

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from esn.audio import prepare_audio, read_audio
from esn.errors import EsnError
from esn.judges import Audio
from esn_utmos.judge import UtmosJudge, expected_shapes
from safetensors.torch import save_file

RATES = (8_000, 16_000, 22_050, 44_100, 48_000)


def tone(rate: int, seconds: float, channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.3 * np.sin(2 * np.pi * (150 + 40 * seed) * t) + 0.02 * rng.standard_normal(t.shape)
    return (wave if channels == 1 else np.stack([wave, 0.5 * wave], axis=1)).astype(np.float32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return UtmosJudge.write_tiny(tmp_path_factory.mktemp("utmos"), seed=0)


@pytest.fixture(scope="module")
def judge(checkpoint):
    return UtmosJudge.load(str(checkpoint))


def test_tiny_checkpoint_has_exactly_the_real_keys_and_is_small(checkpoint):
    state = torch.load(checkpoint, weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_shapes()
    assert sum(v.numel() for v in state.values()) > 100_000_000  # the full UTMOS22 architecture...
    assert checkpoint.stat().st_size < 30_000_000  # ...stored in a small file (shared buffer)


def test_scores_files_at_every_rate_mono_and_stereo(judge, tmp_path):
    audios = []
    for i, (rate, channels) in enumerate(zip(RATES, (1, 2, 1, 2, 1), strict=True)):
        path = tmp_path / f"c{rate}_{channels}.wav"
        sf.write(str(path), tone(rate, 0.2, channels, seed=i), rate, subtype="PCM_16")
        data, sr = read_audio(path)
        audios.append(Audio(data, sr, name=path.name))
    results = judge.judge(audios)
    assert len(results) == len(audios)
    for res in results:
        assert res.label is None and set(res.scores) == {"mos"} and np.isfinite(res.scores["mos"])
    assert {a.samples.shape[1] for a in audios} == {1, 2}
    mos = [r.scores["mos"] for r in results]
    assert len({round(m, 4) for m in mos}) == len(mos)  # each clip really went through the model
    # the judge's number is utmos-pytorch's own score of the 16 kHz mono audio
    direct = judge.scorer.score(torch.from_numpy(prepare_audio(audios[3].samples, audios[3].sample_rate)))
    assert results[3].scores["mos"] == pytest.approx(float(direct.reshape(-1)[0]), rel=1e-5)


def test_equal_length_clips_batch_like_single_ones(judge):
    clips = [Audio(tone(16_000, 0.2, 1, seed=s), 16_000) for s in range(2)]
    batched = [r.scores["mos"] for r in judge.judge(clips)]
    alone = [judge.judge([c])[0].scores["mos"] for c in clips]
    np.testing.assert_allclose(batched, alone, rtol=1e-4)


def test_wrong_checkpoints_fail_instead_of_scoring(tmp_path, checkpoint):
    with pytest.raises(EsnError, match="not found"):
        UtmosJudge.load(str(tmp_path / "missing.pt"))
    with pytest.raises(EsnError, match="no UTMOS checkpoint in"):
        UtmosJudge.load(str(tmp_path))
    other = tmp_path / "model.safetensors"  # another model's weights
    save_file({"encoder.layers.0.weight": torch.zeros(4, 4)}, str(other))
    with pytest.raises(EsnError, match="not a UTMOS22 strong-learner state dict: 224 missing"):
        UtmosJudge.load(str(other))
    state = torch.load(checkpoint, weights_only=True)
    state.pop("output_layers.1.net.3.weight")
    state["feature_extractors.1.embedding.weight"] = torch.zeros(4, 128)
    partial = tmp_path / "partial.pt"
    torch.save({k: v.clone() for k, v in state.items()}, partial)
    with pytest.raises(EsnError, match=r"1 missing .*net\.3\.weight.*1 of another shape"):
        UtmosJudge.load(str(partial))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x04garbage")
    with pytest.raises(EsnError, match="cannot read UTMOS checkpoint"):
        UtmosJudge.load(str(corrupt))


@pytest.mark.slow
def test_safetensors_checkpoint_loads_the_same_weights(tmp_path, checkpoint, judge):
    state = torch.load(checkpoint, weights_only=True)
    path = tmp_path / "utmos_state_dict.safetensors"
    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, str(path))  # fp16: half the size
    clip = [Audio(tone(16_000, 0.2, 1, seed=7), 16_000)]
    from_st = UtmosJudge.load(str(tmp_path)).judge(clip)[0].scores["mos"]
    assert from_st == pytest.approx(judge.judge(clip)[0].scores["mos"], rel=2e-2)


def test_bad_audio_fails_clearly(judge, tmp_path):
    with pytest.raises(EsnError, match="empty"):
        judge.judge([Audio(np.zeros(0, np.float32), 16_000)])
    with pytest.raises(EsnError, match="below 8 kHz"):
        judge.judge([Audio(tone(4_000, 0.25, 1, 0), 4_000)])
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    with pytest.raises(EsnError, match="cannot read audio"):
        read_audio(bad)


def test_plugin_import_is_cheap():
    probe = "import sys, esn_utmos.plugin; print('utmos_pytorch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
