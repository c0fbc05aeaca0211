"""`esn run` killed with SIGKILL mid-recording and mid-evaluation, then rerun, ends with exactly the files of
an uninterrupted run (tiny random Qwen2.5-Omni, tiny random emotion2vec through funasr, synthetic ESD)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("esn_qwen_omni")
pytest.importorskip("esn_emotion2vec")

from pipeline_study import CONFIG, ENV, files, kill_when


def esn(study: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "esn", "run", str(study / "study.toml"), "--run-dir", str(run_dir), "--threads", "1"]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_killed_runs_resume_to_identical_artifacts(study, whole, tmp_path):
    killed = tmp_path / "killed"
    # 1. killed after the first recording batch landed (of 4)
    kill_when(start(esn(study, killed)), lambda: len(list((killed / "record" / "shards").glob("b*.json"))) >= 1)
    recorded = len(list((killed / "record" / "shards").glob("b*.json")))
    assert 1 <= recorded < 4
    # 2. killed again mid-evaluation (of 9 batches)
    kill_when(start(esn(study, killed)), lambda: len(list((killed / "evaluate" / "batches").glob("*.json"))) >= 2)
    evaluated = len(list((killed / "evaluate" / "batches").glob("0*.json")))
    assert 2 <= evaluated < 9
    assert not (killed / "evaluate" / "results.json").exists()
    # 3. finish
    done = subprocess.run(esn(study, killed), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = whole, files(killed)
    assert sorted(a) == sorted(b)
    different = [name for name in a if a[name] != b[name]]
    assert different == [], different
    # the artifacts are all there
    for name in ("report.md", "report.html", "evaluate/results.json", "select/masks_cas_r0.05_c3.safetensors",
                 "select/stats_c3_ser.safetensors", "figures/heatmap_selectors.png", "figures/seen_unseen.png"):
        assert name in a, name
    results = json.loads(a["evaluate/results.json"])
    assert set(results["groups"]) == {"test_seen", "test_unseen", "all"}
    assert len([n for n in a if n.startswith("record/shards/") and n.endswith(".json")]) == 4


@pytest.mark.slow
def test_a_changed_config_is_refused_and_nothing_is_lost(study, tmp_path):
    run_dir = tmp_path / "run"
    cmd = esn(study, run_dir)
    done = subprocess.run([*cmd[:-2], "--stages", "record"], env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    before = files(run_dir)
    changed = study / "changed.toml"
    changed.write_text(CONFIG.replace("max_new_tokens = 6", "max_new_tokens = 7"))
    cmd2 = [sys.executable, "-m", "esn", "run", str(changed), "--run-dir", str(run_dir)]
    done = subprocess.run(cmd2, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1  # the run directory does not fit the config: a runtime failure
    assert "holds record results made with a different configuration" in done.stderr
    assert "generation" in done.stderr
    # a stricter filter finds no success: a clear error, and every recorded attempt is still there
    strict = study / "strict.toml"
    strict.write_text(CONFIG.replace("require_match = false", "require_match = true").replace(
        "tau_wer = 1000.0", "tau_wer = 0.0"))
    done = subprocess.run([sys.executable, "-m", "esn", "select", str(strict), "--run-dir", str(run_dir)],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    assert "no successful conversion for" in done.stderr and "Every record is kept" in done.stderr
    after = files(run_dir)
    assert {k: v for k, v in after.items() if k.startswith("record/")} == {
        k: v for k, v in before.items() if k.startswith("record/")}


def _flip(path: Path, at: int = -9) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x55
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_damaged_outputs_are_computed_again_on_rerun_never_trusted(study, whole_dir, whole, tmp_path):
    """Issue #26 item 6: a byte-flipped evaluate wav, a hand-edited label in a batch file, a wrong-schema
    record/prompts.json and a byte-flipped record shard were accepted by a rerun (exit 0) and flowed into
    the report; now each is computed again, and the run ends with exactly the uninterrupted run's files."""
    run_dir = tmp_path / "run"
    shutil.copytree(whole_dir, run_dir)
    _flip(sorted((run_dir / "evaluate" / "audio").glob("*.wav"))[0])
    batch = run_dir / "evaluate" / "batches" / "000004.json"
    edited = json.loads(batch.read_text())
    for row in edited["records"] if isinstance(edited, dict) else edited:  # (a plain list before #26)
        row["labels"] = {name: "happy" for name in row["labels"]}
    batch.write_text(json.dumps(edited))
    (run_dir / "record" / "prompts.json").write_text(json.dumps({"adapter": "qwen_omni"}))
    _flip(run_dir / "record" / "shards" / "b000002-000000.safetensors")
    done = subprocess.run(esn(study, run_dir), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    err = " ".join(done.stderr.split())
    for words in ("is damaged or was replaced: batch", "000004.json is damaged and will be computed again",
                  "prompts.json has no esn checksum", "b000002-000000: its tensors or wavs are damaged"):
        assert words in err, err[-3000:]
    after = files(run_dir)
    assert sorted(after) == sorted(whole)
    assert [name for name in whole if whole[name] != after[name]] == []


@pytest.mark.slow
def test_a_folder_in_place_of_a_batch_file_is_refused_before_the_batch_is_computed(study, whole_dir, tmp_path):
    """Issue #26 item 7: the folder used to be refused only after its batch (and every missing one) had been
    computed again; now the rerun stops before any conversion and leaves the folder alone."""
    run_dir = tmp_path / "run"
    shutil.copytree(whole_dir, run_dir)
    batches = run_dir / "evaluate" / "batches"
    (batches / "000002.json").unlink()  # a batch that a rerun would compute first
    (batches / "000003.json").unlink()
    (batches / "000003.json").mkdir()
    (batches / "000003.json" / "notes.txt").write_text("mine")
    done = subprocess.run(esn(study, run_dir), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1  # a runtime failure, not usage
    assert "000003.json is a folder, where esn keeps an evaluation batch" in " ".join(done.stderr.split())
    assert not (batches / "000002.json").exists()  # refused before any batch was computed
    assert (batches / "000003.json" / "notes.txt").read_text() == "mine"
