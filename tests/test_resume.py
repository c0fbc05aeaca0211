"""`esn run` killed with SIGKILL mid-recording and mid-evaluation, then rerun, ends with exactly the files of
an uninterrupted run (tiny random Qwen2.5-Omni, tiny random emotion2vec through funasr, synthetic ESD)."""

from __future__ import annotations

import json
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
