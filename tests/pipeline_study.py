"""The tiny study the pipeline's process tests share: a random Qwen2.5-Omni checkpoint, a random
emotion2vec, synthetic ESD, and a config with 4 recording batches and 9 evaluation batches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

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

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def make_study(root: Path) -> Path:
    """Write the checkpoint, judge, data and ``study.toml`` under ``root``; returns ``root``."""
    from esn.pipeline.synthetic import write_esd
    from esn.plugins import registry

    registry().adapter("qwen_omni").write_tiny(root / "checkpoint", seed=0)
    registry().judge("emotion2vec").write_tiny(root / "e2v", seed=0)
    write_esd(root / "esd", speakers=[11, 12, 19], indices=[1, 2, 3], emotions=["neutral"], seconds=0.4)
    (root / "study.toml").write_text(CONFIG)
    return root


def kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` is true; fail if it ends first."""
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"process ended (rc {proc.returncode}) before it could be killed: {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail("timed out waiting for the kill point")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()


def files(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory but its lock files; the manifest without run_dir and git hash
    (where each run lives, and the checkout's HEAD, which other commits may move between two runs)."""
    out = {}
    for p in sorted(run_dir.rglob("*")):
        rel = p.relative_to(run_dir).as_posix()
        if p.is_file() and not rel.startswith(".lock"):
            out[rel] = p.read_bytes()
    manifest = json.loads(out.pop("manifest.json"))
    manifest["config"].pop("run_dir")
    manifest.pop("git")
    out["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return out
