"""`esn run` killed with SIGKILL mid-recording and mid-evaluation, then rerun, ends with exactly the files of
an uninterrupted run (tiny random Qwen2.5-Omni, tiny random emotion2vec through funasr, synthetic ESD)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("esn_qwen_omni")
pytest.importorskip("esn_emotion2vec")

CONFIG = """
seed = 7
[model]
adapter = "qwen_omni"
source = "checkpoint"
[generation]
max_new_tokens = 6
max_audio_tokens = 12
[data]
root = "esd"
splits.identification = [{speakers = ["0011", "0012"], first = 1, last = 2}]
splits.test_seen = [{speakers = ["0011"], first = 3, last = 3}]
splits.test_unseen = [{speakers = ["0019"], first = 1, last = 1}]
[judges]
emotion = [{name = "emotion2vec", source = "e2v", options = {mapping = "five"}}]
loudness_dbfs = -23.0
min_seconds = 0.3
[record]
batch_size = 4
[filter]
require_match = false
tau_wer = 1000.0
[anchor]
rate = 0.05
c = 3
[sweep]
selectors = ["cas", "random"]
[evaluate]
batch_size = 8
bootstrap = 50
save_audio = true
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    from esn.pipeline.synthetic import write_esd
    from esn.plugins import registry

    root = tmp_path_factory.mktemp("study")
    registry().adapter("qwen_omni").write_tiny(root / "checkpoint", seed=0)
    registry().judge("emotion2vec").write_tiny(root / "e2v", seed=0)
    write_esd(root / "esd", speakers=[11, 12, 19], indices=[1, 2, 3], emotions=["neutral"], seconds=0.4)
    (root / "study.toml").write_text(CONFIG)
    return root


def esn(study: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "esn", "run", str(study / "study.toml"), "--run-dir", str(run_dir), "--threads", "1"]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def kill_when(cmd: list[str], ready, timeout: float = 240) -> None:
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` is true; fail if it ends first."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    start = time.time()
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        if time.time() - start > timeout:
            proc.kill()
            pytest.fail("timed out waiting for the kill point")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def files(run_dir: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(run_dir.rglob("*")):
        rel = p.relative_to(run_dir).as_posix()
        if p.is_file() and rel != ".lock":
            out[rel] = p.read_bytes()
    manifest = json.loads(out.pop("manifest.json"))
    manifest["config"].pop("run_dir")  # where each run lives
    manifest.pop("git")  # the checkout's HEAD: other commits may land between the two runs
    out["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return out


@pytest.mark.slow
def test_killed_runs_resume_to_identical_artifacts(study, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(esn(study, whole), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    # 1. killed after the first recording batch landed (of 4)
    kill_when(esn(study, killed), lambda: len(list((killed / "record" / "shards").glob("b*.json"))) >= 1)
    recorded = len(list((killed / "record" / "shards").glob("b*.json")))
    assert 1 <= recorded < 4
    # 2. killed again mid-evaluation (of 9 batches)
    kill_when(esn(study, killed), lambda: len(list((killed / "evaluate" / "batches").glob("*.json"))) >= 2)
    evaluated = len(list((killed / "evaluate" / "batches").glob("0*.json")))
    assert 2 <= evaluated < 9
    assert not (killed / "evaluate" / "results.json").exists()
    # 3. finish
    done = subprocess.run(esn(study, killed), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = files(whole), files(killed)
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
    assert done.returncode == 2
    assert "holds record results made with a different configuration" in done.stderr
    assert "generation" in done.stderr
    # a stricter filter finds no success: a clear error, and every recorded attempt is still there
    strict = study / "strict.toml"
    strict.write_text(CONFIG.replace("require_match = false", "require_match = true").replace(
        "tau_wer = 1000.0", "tau_wer = 0.0"))
    done = subprocess.run([sys.executable, "-m", "esn", "select", str(strict), "--run-dir", str(run_dir)],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    assert "no successful conversion for" in done.stderr and "Every record is kept" in done.stderr
    after = files(run_dir)
    assert {k: v for k, v in after.items() if k.startswith("record/")} == {
        k: v for k, v in before.items() if k.startswith("record/")}
