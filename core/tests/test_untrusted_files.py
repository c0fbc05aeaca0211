"""Regression tests of issue #26's file and audio defects: 1 (a sample rate as a memory and CPU bomb),
2 (writes through symbolic links), 6 and 7 (damaged outputs trusted on rerun; tests/test_resume.py runs
them end to end) and 8's symbolic link loop given as audio. No model is loaded: run directories, batch
files and wavs are written through esn's own code."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from esn.audio import prepare_audio, read_audio, resample
from esn.cli import main
from esn.errors import EsnError
from esn.files import atomic_write_bytes, sha256
from esn.pipeline.config import parse_config
from esn.pipeline.run import Run


def config(tmp_path: Path, **sections) -> dict:
    data = {"run_dir": str(tmp_path / "run"), "seed": 1, "model": {"source": "ckpt"},
            "data": {"root": str(tmp_path / "esd")}, "judges": {"emotion": [{"name": "emotion2vec"}]},
            "record": {"targets": ["happy", "sad"]}, "anchor": {"rate": 0.25, "c": 3},
            "sweep": {"selectors": ["cas", "random"]}}
    return {**data, **sections}


def make_run(tmp_path: Path, shard: tuple[int, int] | None = None, **sections) -> Run:
    return Run(parse_config(config(tmp_path, **sections), base=tmp_path), shard=shard)


# -- 1. resampling: bounded by the audio's length, refused outside 8-384 kHz ------------------------------
_MEASURE = textwrap.dedent("""
    import json, resource, sys, time
    import numpy as np
    from esn.audio import resample
    rates = json.loads(sys.argv[1])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    slowest = 0.0
    for rate in rates:
        wave = np.random.default_rng(rate).standard_normal(int(0.3 * rate)).astype(np.float32)
        start = time.perf_counter()
        resample(wave, rate, 16000)
        slowest = max(slowest, time.perf_counter() - start)
    added = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps({"added_mb": added, "slowest_s": slowest}))
""")


def test_resampling_costs_what_the_audio_is_long_not_what_its_rate_is():
    # 0.3 s at 8009 Hz took 40-66 s and 6.3 GB, and each rate's filter stayed cached (32 of them): here
    # the three rates and 29 more that share no factor with 16 kHz, in one fresh process.
    rates = [8009, 16001, 44101, *(8011 + 1000 * i for i in range(29))]
    done = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(rates)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    cost = json.loads(done.stdout)
    assert cost["added_mb"] < 200 and cost["slowest_s"] < 1.0, cost


@pytest.mark.parametrize("rate", [1_000_003, 384_001, 7_999, 4_000, 0, -16_000])
def test_a_rate_outside_the_accepted_range_is_one_clear_line(tmp_path, rate):
    wave = np.full(100, 0.1, np.float32)
    for call in (lambda: resample(wave, rate, 16_000), lambda: prepare_audio(wave, rate, name="clip.wav")):
        with pytest.raises(EsnError) as caught:
            call()
        message = str(caught.value)
        assert f"sample rate {rate} Hz" in message and "8000-384000 Hz" in message  # docs/pipeline.md's range
        assert "\n" not in message
    with pytest.raises(EsnError, match="resample output: sample rate 1000003 Hz"):
        resample(wave, 16_000, 1_000_003)


def test_a_wav_header_claiming_a_huge_rate_is_refused_before_any_work(tmp_path):
    path = tmp_path / "bomb.wav"
    sf.write(str(path), np.full(300_000, 0.1, np.float32), 1_000_003, subtype="PCM_16")  # 0.3 s at ~1 MHz
    with pytest.raises(EsnError, match=r"bomb.wav: sample rate 1000003 Hz is outside the accepted range"):
        prepare_audio(path)


def test_an_upload_claiming_a_huge_rate_is_refused_from_its_header():
    import io

    from esn.serve.convert import Converter, Limits
    from esn.serve.errors import RequestError

    converter = Converter.__new__(Converter)  # Converter.audio needs only the limits, not a model
    converter.limits = Limits()
    for rate in (1_000_003, 16_001):
        buf = io.BytesIO()
        sf.write(buf, np.full(int(0.3 * rate), 0.1, np.float32), rate, format="WAV", subtype="PCM_16")
        if rate > 384_000:
            with pytest.raises(RequestError) as caught:
                converter.audio(buf.getvalue(), "upload.wav")
            assert (caught.value.status, caught.value.code) == (422, "bad_audio")
            assert "upload.wav: sample rate 1000003 Hz is outside the accepted range" in caught.value.message
        else:  # 16001 Hz left the server at 4.5 GB: now an ordinary 16 kHz clip
            assert converter.audio(buf.getvalue(), "upload.wav").shape == (4800,)


def _tones(t: np.ndarray, below: float = 7000) -> np.ndarray:
    parts = ((150, 0.3), (440, 1.1), (1234, 2.0), (3100, 0.7), (4800, 2.9), (6900, 1.6))
    return sum(0.15 * np.sin(2 * np.pi * f * t + phase) for f, phase in parts if f < below)


def _old_resample(wave: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """esn's resampler before issue #26 (Kaiser-windowed sinc polyphase filters sized by the reduced
    rates, width 16, beta 8, cutoff 0.97 of the slower Nyquist): the reference it replaces."""
    import torch

    g = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // g, new_rate // g
    width, beta, cutoff = 16, 8.0, min(orig, new) * 0.97
    pad = math.ceil(width * orig / cutoff)
    t = torch.arange(-pad, pad + orig, dtype=torch.float64)[None, :] / orig
    t = ((t - torch.arange(0, -new, -1, dtype=torch.float64)[:, None] / new) * cutoff).clamp(-width, width)
    window = torch.special.i0(beta * torch.sqrt(1 - (t / width) ** 2)) / torch.special.i0(torch.tensor(beta))
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(math.pi * t) / (math.pi * t)) * window * cutoff / orig
    x = torch.nn.functional.pad(torch.from_numpy(wave)[None, None, :], (pad, pad + orig))
    y = torch.nn.functional.conv1d(x, kernel[:, None, :].float(), stride=orig).transpose(1, 2).reshape(-1)
    return y[: math.ceil(new * wave.shape[0] / orig)].numpy()


def _snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    inner = slice(320, reference.size - 320)  # 20 ms from each edge, where filters start and stop
    ref, err = reference[inner], other[inner] - reference[inner]
    return float(10 * np.log10(np.mean(ref**2) / max(np.mean(err**2), 1e-30)))


@pytest.mark.parametrize("rate", [44_100, 22_050, 48_000, 32_000, 24_000, 11_025])
def test_resampling_accuracy_on_ordinary_rates(rate):
    """Tolerance: tones from 150 Hz to 6.9 kHz (speech's band; those inside both pass bands) come out
    within 60 dB SNR of the exact 16 kHz signal, and the output has ceil(n * 16000 / rate) samples. Where
    the old resampler was right (its reduced output rate 1: 48 and 32 kHz) the two agree to 40 dB; at
    44.1, 22.05, 24 and 11.025 kHz the old one was wrong (a 1 kHz tone came out near 900 and 800 Hz)."""
    below = 0.45 * min(rate, 16_000)  # inside both rates' pass bands
    wave = _tones(np.arange(int(0.5 * rate)) / rate, below).astype(np.float32)
    exact = _tones(np.arange(8000) / 16_000, below)
    out = resample(wave, rate, 16_000)
    assert out.dtype == np.float32 and out.shape == (math.ceil(wave.size * 16_000 / rate),)
    assert _snr_db(exact, out) > 60
    old = _old_resample(wave, rate, 16_000)
    if 16_000 // math.gcd(rate, 16_000) == 1:
        assert _snr_db(old, out) > 40
    else:
        assert _snr_db(exact, old) < 10  # the defect the new resampler does not have


def test_upsampling_from_8_khz_keeps_the_signal():
    parts = ((200, 0.1), (900, 1.0), (2500, 2.2), (3500, 0.4))  # below 8 kHz's Nyquist

    def tones(t):
        return sum(0.2 * np.sin(2 * np.pi * f * t + p) for f, p in parts)

    out = resample(tones(np.arange(4000) / 8000).astype(np.float32), 8000, 16_000)
    assert out.shape == (8000,) and _snr_db(tones(np.arange(8000) / 16_000), out) > 60


# -- 8. a symbolic link loop given as audio -------------------------------------------------------------
def test_a_symbolic_link_loop_as_audio_is_named_as_such(tmp_path):
    from esn.pipeline.data import CSVDataset

    (tmp_path / "a.wav").symlink_to("b.wav")
    (tmp_path / "b.wav").symlink_to("a.wav")
    (tmp_path / "gone.wav").symlink_to("nothing-here.wav")
    for call in (lambda: read_audio(tmp_path / "a.wav"), lambda: prepare_audio(tmp_path / "a.wav")):
        with pytest.raises(EsnError, match=r"a.wav is a symbolic link loop"):
            call()
    with pytest.raises(EsnError, match=r"gone.wav is a symbolic link to a file that does not exist"):
        read_audio(tmp_path / "gone.wav")
    (tmp_path / "loop.csv").write_text("path,transcript,speaker,split\na.wav,hello,s1,test_seen\n")
    with pytest.raises(EsnError, match=r"loop.csv line 2: audio file .*a.wav is a symbolic link loop"):
        CSVDataset(tmp_path / "loop.csv")
    with pytest.raises(EsnError, match=r"audio file not found: .*missing.wav"):
        read_audio(tmp_path / "missing.wav")


def test_esn_convert_names_a_link_loop(tmp_path, capsys):
    (tmp_path / "a.wav").symlink_to("a.wav")
    (tmp_path / "ckpt").mkdir()
    assert main(["convert", "--adapter", "qwen_omni", "--model", str(tmp_path / "ckpt"), str(tmp_path / "a.wav"),
                 "--emotion", "happy", "-o", str(tmp_path / "o.wav")]) == 1  # a runtime failure, not usage
    err = capsys.readouterr().err
    assert "symbolic link loop" in err and "not found" not in err, err


# -- 2. nothing written, locked or read back through a symbolic link ------------------------------------
# Every kind of file esn writes or locks in a run directory (rundir.py's layout), at its real name.
FILE_KINDS = [
    ".lock", ".lock-open", ".lock-shard-0-of-2", "manifest.json", ".manifest.json.a1b2c3d4.esn-tmp",
    "record/layout.json", "record/prompts.json", "record/shards/b000000-000000.safetensors",
    "record/shards/b000000-000000.json", "record/audio/s1%7Chappy.wav", "select/masks_cas_r0.25_c3.safetensors",
    "select/stats_c3_ser.safetensors", "select/summary.json", "evaluate/masks.json", "evaluate/batches/000000.json",
    "evaluate/audio/s1%7Chappy.wav", "evaluate/results.json", "human/labels.csv", "human/ab-kit/trials.csv",
    "report.md", "report.html", "figures/heatmap_selectors.png", "judge_eval.json",
]


def _planted(tmp_path: Path, rel: str) -> tuple[Path, bytes]:
    """A run directory that esn made, with ``rel`` a link to a file outside it; returns that file and its bytes."""
    make_run(tmp_path).open().close()
    outside = tmp_path / "outside" / "precious.dat"
    outside.parent.mkdir(exist_ok=True)
    outside.write_bytes(b"years of work\n")
    link = tmp_path / "run" / rel
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(outside)
    return outside, outside.read_bytes()


@pytest.mark.parametrize("rel", FILE_KINDS)
def test_a_link_to_an_outside_file_is_refused_and_the_file_left_untouched(tmp_path, rel):
    outside, before = _planted(tmp_path, rel)
    for shard in (None, (0, 2)):
        run = make_run(tmp_path, shard)
        with pytest.raises(EsnError) as caught:
            run.open()
        message = str(caught.value)
        assert "symbolic link" in message and rel in message and str(outside) in message, message
        run.close()
    assert outside.read_bytes() == before
    assert (tmp_path / "run" / rel).is_symlink()  # and the link is left for its owner to remove


@pytest.mark.parametrize("rel", ["evaluate/audio", "record", "select", "figures", "evaluate/batches"])
def test_a_linked_folder_is_refused_and_nothing_written_into_it(tmp_path, rel):
    make_run(tmp_path).open().close()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "000000.json").write_text("mine")
    folder = tmp_path / "run" / rel
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(EsnError, match=rf"holds symbolic links \({rel} -> "):
        make_run(tmp_path).open()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["000000.json"]
    assert (elsewhere / "000000.json").read_text() == "mine"


def test_esn_run_refuses_a_linked_lock_in_one_line_and_truncates_nothing(tmp_path, capsys):
    pytest.importorskip("esn_emotion2vec")
    from esn.pipeline.synthetic import write_esd

    write_esd(tmp_path / "esd", speakers=[11, 19], indices=[1, 2, 251], emotions=["neutral"], seconds=0.1)
    splits = {"splits": {"identification": [{"speakers": ["0011"], "first": 1, "last": 2}],
                         "test_seen": [{"speakers": ["0011"], "first": 251, "last": 251}],
                         "test_unseen": [{"speakers": ["0019"], "first": 1, "last": 2}]}}
    outside, before = _planted(tmp_path, ".lock")
    cfg = tmp_path / "study.json"
    cfg.write_text(json.dumps(config(tmp_path, data={"root": str(tmp_path / "esd"), **splits})))
    assert main(["run", str(cfg)]) == 1  # a runtime failure, not usage
    err = capsys.readouterr().err
    assert "holds symbolic links (.lock -> " in err and "Traceback" not in err, err
    assert outside.read_bytes() == before


def test_a_hard_link_to_an_outside_file_is_never_truncated(tmp_path):
    make_run(tmp_path).open().close()
    for name in (".lock", ".lock-open"):
        outside = tmp_path / f"precious{name}"
        outside.write_bytes(b"years of work\n")
        (tmp_path / "run" / name).unlink()
        os.link(outside, tmp_path / "run" / name)
    make_run(tmp_path).open().close()  # a hard link is no link to refuse: it is simply never truncated
    assert [(tmp_path / f"precious{n}").read_bytes() for n in (".lock", ".lock-open")] == [b"years of work\n"] * 2
    atomic_write_bytes(tmp_path / "run" / ".lock", b"")  # a write replaces the name, not the file
    assert (tmp_path / "precious.lock").read_bytes() == b"years of work\n"


def test_a_link_planted_after_the_check_is_still_not_followed(tmp_path):
    from esn.files import open_nofollow

    outside = tmp_path / "precious.dat"
    outside.write_bytes(b"years of work\n")
    (tmp_path / ".lock").symlink_to(outside)
    with pytest.raises(EsnError, match=r"\.lock is a symbolic link: esn does not write or lock through links"):
        open_nofollow(tmp_path / ".lock")
    (tmp_path / "batch.json").symlink_to(outside)
    atomic_write_bytes(tmp_path / "batch.json", b"{}")  # the rename replaces the link itself
    assert not (tmp_path / "batch.json").is_symlink() and outside.read_bytes() == b"years of work\n"
    (tmp_path / "folder").mkdir()
    with pytest.raises(EsnError, match="is not a regular file"):
        open_nofollow(tmp_path / "folder", os.O_RDONLY)
    os.mkfifo(tmp_path / ".lock-open")  # would block a plain open for writing until a reader came
    with pytest.raises(EsnError, match=r"\.lock-open is not a regular file"):
        open_nofollow(tmp_path / ".lock-open")


# -- 6 and 7. damaged outputs are computed again or refused, never trusted -----------------------------
def _batch(tmp_path: Path):
    from esn.pipeline.evaluate import write_batch
    from esn.pipeline.files import atomic_write_wav
    from esn.pipeline.grid import EvalAttempt

    batch = [EvalAttempt("test_seen", "baseline", None, "s0", "happy")]
    digest = atomic_write_wav(tmp_path / "audio" / "x.wav", np.linspace(-0.5, 0.5, 1600, dtype=np.float32), 16_000)
    path = tmp_path / "batches" / "000000.json"
    write_batch(path, [{"id": batch[0].id, "labels": {"j": "happy"}, "audio": "audio/x.wav", "audio_sha256": digest}])
    return batch, path


def _finished_warns(tmp_path, path, batch, words: str) -> None:
    from esn.pipeline.evaluate import finished

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not finished(tmp_path, path, batch)
    assert any(words in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_a_byte_flipped_evaluation_wav_means_its_batch_is_computed_again(tmp_path):
    from esn.pipeline.evaluate import finished

    batch, path = _batch(tmp_path)
    assert finished(tmp_path, path, batch)
    wav = tmp_path / "audio" / "x.wav"
    data = bytearray(wav.read_bytes())
    data[-10] ^= 0xFF
    wav.write_bytes(bytes(data))
    _finished_warns(tmp_path, path, batch, "x.wav is damaged or was replaced: batch 000000.json will be computed again")


def test_a_hand_edited_label_in_a_batch_file_is_not_trusted(tmp_path):
    from esn.pipeline.evaluate import read_batch

    batch, path = _batch(tmp_path)
    data = json.loads(path.read_text())
    data["records"][0]["labels"]["j"] = "sad"
    path.write_text(json.dumps(data))
    _finished_warns(tmp_path, path, batch, "is damaged and will be computed again")
    with pytest.raises(EsnError, match=r"000000.json is damaged or was edited .*run `esn evaluate`"):
        read_batch(path, "run `esn evaluate` to compute it again")
    path.write_text(json.dumps(data["records"]))  # an old or foreign list without a checksum
    with pytest.raises(EsnError, match=r"000000.json has no esn checksum"):
        read_batch(path, "run `esn evaluate` to compute it again")


def test_a_folder_in_place_of_a_batch_file_is_refused_before_any_work(tmp_path):
    from esn.pipeline.evaluate import finished

    batch, path = _batch(tmp_path)
    path.unlink()
    path.mkdir()
    with pytest.raises(EsnError, match=r"000000.json is a folder, where esn keeps an evaluation batch: move it away"):
        finished(tmp_path, path, batch)
    path.rmdir()
    _batch(tmp_path)
    (tmp_path / "audio" / "x.wav").unlink()
    (tmp_path / "audio" / "x.wav").mkdir()
    with pytest.raises(EsnError, match=r"x.wav is a folder, where esn keeps a wav of an evaluation batch"):
        finished(tmp_path, path, batch)


@pytest.mark.parametrize("content", [{"adapter": "qwen_omni"}, {"system_prompt": 3, "instruction": "x", "adapter": "a"},
                                     ["not", "an", "object"]])
def test_a_wrong_schema_prompts_file_is_refused_not_reported_as_the_default(tmp_path, content):
    from esn.pipeline import record
    from esn.pipeline.files import atomic_write_json, seal

    run = make_run(tmp_path)
    with run:
        path = run.rundir.record / "prompts.json"
        atomic_write_json(path, content)  # as hand-written: no checksum
        with pytest.raises(EsnError, match=r"prompts.json has no esn checksum .*run `esn record` to write it again"):
            record.prompts(run)
        if isinstance(content, dict):  # sealed but of another schema
            atomic_write_json(path, seal(content))
            with pytest.raises(EsnError, match=r"prompts.json is not an esn prompts file"):
                record.prompts(run)
        good = {"adapter": "qwen_omni", "system_prompt": None, "instruction": "Sound {emotion}.",
                "instruction_channel": True, "speaks_given_words": False, "text_out": True}
        atomic_write_json(path, seal(good))
        assert record.prompts(run) == good
        edited = json.loads(path.read_text()) | {"system_prompt": "Be sad."}
        path.write_text(json.dumps(edited))
        with pytest.raises(EsnError, match=r"prompts.json is damaged or was edited"):
            record.prompts(run)


def test_a_damaged_record_shard_or_wav_is_dropped_and_recorded_again(tmp_path):
    from esn.hookpoints import HookPoint, Layout
    from esn.pipeline.files import atomic_write_wav
    from esn.store import AttemptRecord, AttemptStore

    store = AttemptStore(tmp_path, Layout([HookPoint("lm", 0, 4, "m.0")]), architecture="tiny")
    wav = tmp_path / "audio" / "a.wav"
    digest = atomic_write_wav(wav, np.linspace(-0.5, 0.5, 800, dtype=np.float32), 16_000)
    for k in range(2):
        rec = AttemptRecord(f"s{k}|happy", "happy", "w", "w", {"audio": "audio/a.wav", "audio_sha256": digest})
        store.append([rec], np.ones((1, 4), np.int64), np.full((1, 1), 2), worker=f"b{k:06d}")

    def wav_ok(rec):
        return sha256((tmp_path / rec.meta["audio"]).read_bytes()) == rec.meta["audio_sha256"]

    assert store.damaged_shards(wav_ok) == []
    tensors = tmp_path / "shards" / "b000001-000000.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0x01
    tensors.write_bytes(bytes(data))
    assert store.damaged_shards(wav_ok) == ["b000001-000000"]
    wav.write_bytes(wav.read_bytes()[:-2] + b"\x7f\x7f")
    assert store.damaged_shards(wav_ok) == ["b000000-000000", "b000001-000000"]


def test_an_edited_results_file_is_refused_by_its_readers(tmp_path):
    """evaluate/results.json (and select's summary, positions, human_similarity, judge_eval.json, evaluate's
    masks.json) are sealed the same way: the report refuses an edited one instead of printing it."""
    from esn.pipeline import compare, evaluate
    from esn.pipeline.files import atomic_write_json, seal

    make_run(tmp_path).open().close()  # a manifest, so that compare takes it for a run directory
    path = tmp_path / "run" / "evaluate" / "results.json"
    atomic_write_json(path, seal({"meta": {"judges": ["j"]}, "groups": {"all": {"cas": {"self": 0.1}}}}))
    assert evaluate.results(path)["groups"]["all"]["cas"]["self"] == 0.1
    edited = json.loads(path.read_text())
    edited["groups"]["all"]["cas"]["self"] = 0.9
    path.write_text(json.dumps(edited))
    with pytest.raises(EsnError, match=r"results.json is damaged or was edited .*run `esn evaluate` to write it again"):
        evaluate.results(path)
    with pytest.raises(EsnError, match=r"results.json is damaged or was edited"):
        compare.load_run_results(tmp_path / "run")
